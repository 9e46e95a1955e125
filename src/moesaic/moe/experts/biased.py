"""Plain MLP experts with biases (``experts: {kind: mlp_bias}``): the FFN of BERT-family encoders as experts.

BERT (Devlin et al. 2019) and its distilled descendants (DistilBERT, MiniLM) have biased FFNs,
``act(x W_up^T + b_up) W_down^T + b_down``; the bias-free stacked experts (``mlp``, ``glu``) cannot hold a copy
of them. Sparse upcycling of such a model (Komatsuzaki et al. 2023) and domain-expert encoders (Hallee et al.
2024, "Contrastive Learning and Mixture of Experts Enables Precise Vector Embeddings", who upcycle BERT-family
sentence encoders) need these: expert e is ``act(x W_up[e]^T + b_up[e]) W_down[e]^T + b_down[e]``, weighted by
the routing weight like every other kind. One readable path (a loop over the experts that received rows); the
``backend`` argument of the other stacked kinds is accepted and has nothing to choose.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.activations import ACTIVATIONS, Activation
from moesaic.core.config import rule
from moesaic.core.types import DispatchPlan
from moesaic.moe.experts.base import EXPERTS, Experts, ExpertsConfig
from moesaic.moe.experts.stacked_ffn import add_stacked_ffn, init_stacked_ffn


@dataclasses.dataclass
class BiasedMLPExpertsConfig(ExpertsConfig):
    """``backend`` is accepted as for the other stacked kinds (one path here: the per-expert loop)."""

    activation: Activation = "gelu"
    init_std: float | None = rule(None, gt=0.0)
    backend: str = "auto"


@EXPERTS.register("mlp_bias")
class BiasedMLPExperts(Experts):
    """Plain FFN experts with biases: act(x W_up^T + b_up) W_down^T + b_down (BERT's FFN, one per expert)."""

    Config = BiasedMLPExpertsConfig
    cfg: BiasedMLPExpertsConfig
    gated = False
    w_up_EHD: nn.Parameter
    w_down_EDF: nn.Parameter

    def __init__(self, cfg: BiasedMLPExpertsConfig, d_model: int, d_ff: int, num_experts: int, **kw: Any):
        super().__init__(cfg, d_model, d_ff, num_experts)
        add_stacked_ffn(self, num_experts, d_model, d_ff, gated=False)
        self.b_up_EF = nn.Parameter(torch.zeros(num_experts, d_ff))
        self.b_down_ED = nn.Parameter(torch.zeros(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal weights (std ``init_std`` or 1/sqrt(fan_in)), zero biases."""
        init_stacked_ffn(self, self.cfg.init_std)
        nn.init.zeros_(self.b_up_EF)
        nn.init.zeros_(self.b_down_ED)

    def rows(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """``y_ND``: expert e's biased FFN on its ``counts_E[e]`` rows (rows grouped by expert)."""
        act = ACTIVATIONS[self.cfg.activation]
        out, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            if n == 0:
                continue
            x = x_ND[start:start + n]
            h = act(x @ self.w_up_EHD[e].t() + self.b_up_EF[e])
            out.append(h @ self.w_down_EDF[e].t() + self.b_down_ED[e])
            start += n
        return torch.cat(out) if out else x_ND.new_zeros(0, self.d_model)

    def forward(self, x_TD: Tensor, plan: DispatchPlan, backend: str | None = None) -> Tensor:
        """``y_TD``: gather, every expert on its rows, weighted combine (``backend`` is accepted and unused)."""
        return plan.combine(self.rows(plan.gather(x_TD), plan.counts_E))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"activation={self.cfg.activation}, bias=True")
