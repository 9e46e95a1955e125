"""Dropless dispatch by a stable sort of the assignments by expert (MegaBlocks-style, no capacity)."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from moesaic.core.registry import DISPATCHERS
from moesaic.core.types import RoutingDecision
from moesaic.moe.dispatch.base import Dispatcher, DispatcherConfig, DispatchState, sort_by_expert


@dataclasses.dataclass
class SortDispatcherConfig(DispatcherConfig):
    """The dropless sort has no settings."""


@DISPATCHERS.register("sort")
class SortDispatcher(Dispatcher):
    """Dropless: every assignment is computed; memory O(N*D), no [T, E] one-hot (the default)."""

    Config = SortDispatcherConfig
    index_dispatch = True

    def dispatch(self, x_TD: Tensor, decision: RoutingDecision) -> tuple[Tensor, Tensor, DispatchState]:
        tok_N, counts_E, state = SortDispatcher.dispatch_indices(self, decision)
        return x_TD.index_select(0, tok_N), counts_E, state

    def dispatch_indices(self, decision: RoutingDecision) -> tuple[Tensor, Tensor, DispatchState]:
        order_N, tok_N, counts_E = sort_by_expert(decision)
        state = DispatchState(tok_N, decision.weight_N[order_N], decision.num_tokens, decision.dropped)
        return tok_N, counts_E, state
