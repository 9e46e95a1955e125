"""The dispatcher interface (docs/design.md, "The data path").

``plan(decision) -> DispatchPlan``: which token rows each expert computes, in expert order, and with which
combine weight they return. Dispatchers have no parameters and never touch the activations: the experts
run the plan (``y_TD = experts(x_TD, plan)``), so a dispatcher is the same whatever backend, wrapper
(expert parallelism, offloading) or device the experts use.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from moesaic.core.config import ComponentConfig
from moesaic.core.registry import Registry
from moesaic.core.types import DispatchPlan, RoutingDecision, scatter_combine

DISPATCHERS: Registry[type[Dispatcher]] = Registry(
    "dispatcher", "moesaic.moe.dispatch", base="moesaic.moe.dispatch.base:Dispatcher", default="sort")

__all__ = ["Dispatcher", "DispatcherConfig", "scatter_combine", "sort_plan"]


@dataclasses.dataclass
class DispatcherConfig(ComponentConfig):
    registry = DISPATCHERS


class Dispatcher(nn.Module):
    """Turns a :class:`RoutingDecision` into a :class:`DispatchPlan`. A module only for ``train()``/``eval()``
    (capacity factors differ) and printing; it holds no parameters or buffers."""

    Config: ClassVar[type[DispatcherConfig]] = DispatcherConfig

    def __init__(self, cfg: DispatcherConfig, num_experts: int, top_k: int):
        super().__init__()
        self.cfg, self.num_experts, self.top_k = cfg, num_experts, top_k

    def plan(self, decision: RoutingDecision) -> DispatchPlan:
        raise NotImplementedError  # abstract: every registered dispatcher implements it


def sort_plan(decision: RoutingDecision) -> DispatchPlan:
    """The dropless plan: assignments in a stable order by expert (MegaBlocks: Gale et al. 2023), so rows
    of one expert keep their token order and every run gives the same grouping."""
    order_N = torch.argsort(decision.expert_idx_N, stable=True)  # integer ids: nothing to track for autograd
    counts_E = torch.bincount(decision.expert_idx_N, minlength=decision.num_experts)
    return DispatchPlan(decision.token_idx_N[order_N], decision.weight_N[order_N], counts_E,
                        decision.num_tokens, decision.dropped)
