"""Dropless dispatch by a stable sort of the assignments by expert (MegaBlocks-style, no capacity)."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from moesaic.dispatch.base import Dispatcher, DispatcherConfig, DispatchState, sort_by_expert
from moesaic.registry import DISPATCHERS
from moesaic.types import RoutingDecision


@dataclasses.dataclass
class SortDispatcherConfig(DispatcherConfig):
    kind: str = "sort"


@DISPATCHERS.register("sort")
class SortDispatcher(Dispatcher):
    """Dropless: every assignment is computed; memory O(N*D), no [T, E] one-hot (the default)."""

    Config = SortDispatcherConfig

    def dispatch(self, x_TD: Tensor, decision: RoutingDecision) -> tuple[Tensor, Tensor, DispatchState]:
        order_N, tok_N, counts_E = sort_by_expert(decision)
        x_ND = x_TD.index_select(0, tok_N)
        state = DispatchState(tok_N, decision.weight_N[order_N], decision.num_tokens, decision.dropped)
        return x_ND, counts_E, state
