"""FFN experts with Experts Weights Averaging after every optimizer step (EWA; Huang et al. 2023,
"Experts Weights Averaging: A New General Training Scheme for Vision Transformers").

``share_rate`` is the fraction of each expert's weights replaced by the mean of the *other* experts,

    W_i <- (1 - share_rate) * W_i + share_rate * mean_{j != i} W_j,

applied to every stacked parameter of all experts at once, from the pre-update values, after every
optimizer step (``on_optimizer_step``, called by :func:`moesaic.on_optimizer_step`). ``share_rate = 0``
is a no-op, ``share_rate = (E-1)/E`` sets every expert to the mean, and the sum over experts is unchanged
by any step. We could not confirm the paper's exact update form and default share rate against its text;
0.3 is our default. Route with ``router: {kind: random_partition}`` and merge back into one FFN after
training with :func:`moesaic.transforms.ewa_merge.merge_experts_`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from moesaic.core.config import rule
from moesaic.moe.experts.base import EXPERTS
from moesaic.moe.experts.stacked_ffn import FFNExperts, GLUExpertsConfig


@dataclasses.dataclass
class EWAExpertsConfig(GLUExpertsConfig):
    gated: bool = True
    share_rate: float = rule(0.3, ge=0.0, le=1.0)
    every: int = rule(1, ge=1)  # average every `every` optimizer steps (1 = after every iteration, the paper)


@torch.no_grad()
def ewa_average_(w_E: Tensor, share_rate: float) -> None:
    """In place: ``w_i <- (1 - s) w_i + s * mean_{j != i} w_j`` along dim 0, from the pre-update values."""
    E = w_E.shape[0]
    if E < 2 or share_rate == 0.0:
        return
    total = w_E.sum(0, keepdim=True)
    others_mean = (total - w_E) / (E - 1)
    w_E.mul_(1.0 - share_rate).add_(others_mean, alpha=share_rate)


@EXPERTS.register("ewa")
class EWAExperts(FFNExperts):
    """FFN experts averaged toward each other after every optimizer step with a share rate (EWA, Huang 2023)."""

    Config = EWAExpertsConfig
    cfg: EWAExpertsConfig

    def __init__(self, cfg: EWAExpertsConfig, d_model: int, d_ff: int, num_experts: int, **kw: Any):
        self.gated = cfg.gated  # instance attribute read by FFNExperts.__init__ for the up-projection width
        super().__init__(cfg, d_model, d_ff, num_experts, **kw)

    def on_optimizer_step(self, step: int) -> None:
        if step % self.cfg.every == 0:
            self.average_()

    def average_(self, share_rate: float | None = None) -> None:
        s = self.cfg.share_rate if share_rate is None else share_rate
        for name in self.stacked_names():
            ewa_average_(getattr(self, name).data, s)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", share_rate={self.cfg.share_rate}"
