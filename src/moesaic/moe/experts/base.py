"""The experts interface (docs/design.md, "Experts"): compute every expert on rows grouped by expert.

``forward(x_ND, counts_E) -> y_ND``: rows ``[sum(counts_E[:e]), sum(counts_E[:e+1]))`` belong to expert e.
Weights are stacked per expert (3-D tensors, ``E`` first) so one tensor holds one weight kind of all
experts; :meth:`Experts.expert_state` exposes one expert's tensors for offloading, conversion and
analysis, and :meth:`Experts.load_expert_state` writes them back.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import Tensor, nn

from moesaic.core.config import ComponentConfig
from moesaic.core.registry import EXPERTS


@dataclasses.dataclass
class ExpertsConfig(ComponentConfig):
    registry = EXPERTS


class Experts(nn.Module):
    Config: ClassVar[type[ExpertsConfig]] = ExpertsConfig

    def __init__(self, cfg: ExpertsConfig, d_model: int, d_ff: int, num_experts: int):
        super().__init__()
        self.cfg, self.d_model, self.d_ff, self.num_experts = cfg, d_model, d_ff, num_experts

    def forward(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        raise NotImplementedError  # abstract: every registered experts kind implements it

    def stacked_names(self) -> list[str]:
        """Names of the parameters stacked along dim 0 by expert."""
        return [n for n, p in self.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == self.num_experts]

    def expert_state(self, e: int) -> dict[str, Tensor]:
        """Expert e's tensors (views into the stacked weights)."""
        return {n: getattr(self, n)[e] for n in self.stacked_names()}

    def load_expert_state(self, e: int, state: dict[str, Tensor]) -> None:
        for n, t in state.items():
            getattr(self, n).data[e].copy_(t)
