"""The experts interface (docs/design.md, "Experts interface"): what the MoE layer calls and what a
wrapper (expert parallelism, offloaded or quantized experts) implements.

An experts module is an ``nn.Module`` with

* ``forward(x_TD, plan) -> y_TD``: compute every expert on the rows the :class:`DispatchPlan` assigns it
  and return the weighted sum per token (``plan.combine(expert_e(plan.gather(x_TD)))``; a backend may
  fold gather and combine into its kernel). ``x_TD`` is ``[T, D]``, ``y_TD`` ``[T, D]``; padding tokens
  have no rows and get 0.
* ``num_experts``: the E the plan's ``counts_E`` is indexed by (all experts of the layer, also when a
  wrapper holds only some of them locally).
* ``stacked_names()``: names of the parameters stacked along dim 0 by expert (``[E, ...]``), e.g.
  ``["w_up_EHD", "w_down_EDF"]``: what checkpoints, expert parallelism and merges slice by expert.
* ``expert_state(e) -> {name: tensor}`` and ``load_expert_state(e, state)``: one expert's tensors (views
  into the stacked weights) and writing them back, for offloading, conversion and analysis.

A wrapper delegates these to the experts it wraps and may keep the weights elsewhere (another device, a
file, another precision), as long as outputs and gradients are the same function of ``x_TD`` and the plan.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import Tensor, nn

from moesaic.core.config import ComponentConfig
from moesaic.core.registry import Registry
from moesaic.core.types import DispatchPlan

EXPERTS: Registry[type[Experts]] = Registry(
    "experts", "moesaic.moe.experts", base="moesaic.moe.experts.base:Experts", default="glu")


@dataclasses.dataclass
class ExpertsConfig(ComponentConfig):
    registry = EXPERTS


class Experts(nn.Module):
    """Base class of the registered experts kinds (see the module docstring for the interface)."""

    Config: ClassVar[type[ExpertsConfig]] = ExpertsConfig

    def __init__(self, cfg: ExpertsConfig, d_model: int, d_ff: int, num_experts: int):
        super().__init__()
        self.cfg, self.d_model, self.d_ff, self.num_experts = cfg, d_model, d_ff, num_experts

    def forward(self, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        raise NotImplementedError  # abstract: every registered experts kind implements it

    def stacked_names(self) -> list[str]:
        """Names of the parameters stacked along dim 0 by expert."""
        return [n for n, p in self.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == self.num_experts]

    def expert_state(self, e: int) -> dict[str, Tensor]:
        """Expert e's tensors (views into the stacked weights)."""
        return {n: getattr(self, n)[e] for n in self.stacked_names()}

    def load_expert_state(self, e: int, state: dict[str, Tensor]) -> None:
        """Copy one expert's tensors (as returned by :meth:`expert_state`) into the stacked weights."""
        for n, t in state.items():
            getattr(self, n).data[e].copy_(t)
