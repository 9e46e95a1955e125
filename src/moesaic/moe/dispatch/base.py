"""The dispatcher interface (docs/design.md, "Dispatcher").

``dispatch(x_TD, decision) -> (x_ND, counts_E, state)`` returns the token rows grouped by expert
(``counts_E[e]`` rows for expert e, experts in order) and an opaque state that
``combine(y_ND, state) -> y_TD`` uses to scatter the expert outputs back, weighted by the routing
weights. Dispatchers have no parameters. An expert-parallel dispatcher returns only the rows of the
local experts (``counts_E`` then has ``E_local`` entries) and hides the exchange inside these two
calls, so the layer never changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from moesaic.core.config import ComponentConfig
from moesaic.core.registry import DISPATCHERS
from moesaic.core.types import RoutingDecision


@dataclasses.dataclass
class DispatcherConfig(ComponentConfig):
    registry = DISPATCHERS


@dataclasses.dataclass
class DispatchState:
    """What combine needs: for each grouped row, its token and weight; plus bookkeeping."""

    token_idx_N: Tensor  # [N] destination token of each grouped row
    weight_N: Tensor  # [N] combine weight of each grouped row
    num_tokens: int
    dropped: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class Dispatcher(nn.Module):
    Config: ClassVar[type[DispatcherConfig]] = DispatcherConfig
    #: True when :meth:`dispatch_indices` works: the rows stay local, so experts may fuse the gather and
    #: the weighted combine into their own kernels (``experts/grouped_glu.py``).
    index_dispatch: ClassVar[bool] = False

    def __init__(self, cfg: DispatcherConfig, num_experts: int, top_k: int):
        super().__init__()
        self.cfg, self.num_experts, self.top_k = cfg, num_experts, top_k

    def dispatch(self, x_TD: Tensor, decision: RoutingDecision) -> tuple[Tensor, Tensor, DispatchState]:
        raise NotImplementedError  # abstract: every registered dispatcher implements it

    def dispatch_indices(self, decision: RoutingDecision) -> tuple[Tensor, Tensor, DispatchState]:
        """Like :meth:`dispatch` without moving rows: ``(token_idx_N, counts_E, state)``, where
        ``x_TD[token_idx_N]`` would be the grouped rows and ``state.weight_N`` their combine weights."""
        raise NotImplementedError(f"{type(self).__name__} moves rows itself (index_dispatch = False)")

    def combine(self, y_ND: Tensor, state: DispatchState) -> Tensor:
        return scatter_combine(y_ND, state.token_idx_N, state.weight_N, state.num_tokens)


def sort_by_expert(decision: RoutingDecision) -> tuple[Tensor, Tensor, Tensor]:
    """Stable order of assignments by expert: ``(order_N, token_idx_N sorted, counts_E)``."""
    with torch.no_grad():
        order_N = torch.argsort(decision.expert_idx_N, stable=True)
        counts_E = torch.bincount(decision.expert_idx_N, minlength=decision.num_experts)
    return order_N, decision.token_idx_N[order_N], counts_E


def scatter_combine(y_ND: Tensor, token_idx_N: Tensor, weight_N: Tensor, num_tokens: int) -> Tensor:
    """``y_TD[t] = sum_{n: token_idx_N[n] = t} weight_N[n] * y_ND[n]``; tokens without a row get 0."""
    y_TD = y_ND.new_zeros(num_tokens, y_ND.shape[1])
    return y_TD.index_add_(0, token_idx_N, y_ND * weight_N.to(y_ND.dtype).unsqueeze(1))
