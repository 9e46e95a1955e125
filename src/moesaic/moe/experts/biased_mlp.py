"""FFN experts with biases: ``act(x W_up^T + b_up) W_down^T + b_down`` per expert (gated: ``act(x W_g^T + b_g)
(x W_u^T + b_u)``), the FFN of BERT-family encoders and ViTs.

Sparse upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints") copies a dense FFN into every expert; a BERT FFN has biases, so its experts need them:
with top-k weights that sum to one, ``sum_k w_k (f(x) + b_down) = f(x) + b_down`` and the upcycled layer is
the dense FFN at step 0. Stacked like :mod:`moesaic.moe.experts.stacked_ffn` (``w_up_EHD`` ``[E, H, D]``,
``w_down_EDF`` ``[E, D, F]``) plus ``b_up_EH`` and ``b_down_ED``. The compute is the readable reference:
``plan.combine`` of each expert on its gathered rows (one matmul pair per expert that has rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.activations import ACTIVATIONS, Activation
from moesaic.core.config import require, rule
from moesaic.core.types import DispatchPlan
from moesaic.moe.experts.backends import BACKENDS
from moesaic.moe.experts.base import EXPERTS, Experts, ExpertsConfig
from moesaic.moe.experts.stacked_ffn import add_stacked_ffn, init_stacked_ffn


@dataclasses.dataclass
class BiasedMLPExpertsConfig(ExpertsConfig):
    activation: Activation = "gelu"
    gated: bool = False
    init_std: float | None = rule(None, gt=0.0)
    #: Accepted for the experts interface; this kind has one implementation, the per-expert loop.
    backend: str = "auto"

    def validate(self, path: str) -> None:
        require(self.backend == "auto" or self.backend in BACKENDS, f"{path}.backend", self.backend,
                f"must be auto or one of {', '.join(BACKENDS.names())}")


@EXPERTS.register("biased_mlp")
class BiasedMLPExperts(Experts):
    """FFN experts with biases on both projections (BERT/ViT FFNs); plain or gated."""

    Config = BiasedMLPExpertsConfig
    cfg: BiasedMLPExpertsConfig
    w_up_EHD: nn.Parameter
    w_down_EDF: nn.Parameter

    def __init__(self, cfg: BiasedMLPExpertsConfig, d_model: int, d_ff: int, num_experts: int, **kw: Any):
        super().__init__(cfg, d_model, d_ff, num_experts)
        self.gated = cfg.gated
        add_stacked_ffn(self, num_experts, d_model, d_ff, self.gated)
        self.b_up_EH = nn.Parameter(torch.zeros(num_experts, self.w_up_EHD.shape[1]))
        self.b_down_ED = nn.Parameter(torch.zeros(num_experts, d_model))
        init_stacked_ffn(self, cfg.init_std)

    def expert(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert e on its rows ``x_ND`` (biases included)."""
        h_NH = torch.addmm(self.b_up_EH[e], x_ND, self.w_up_EHD[e].t())
        act = ACTIVATIONS[self.cfg.activation]
        a_NF = act(h_NH[:, :self.d_ff]) * h_NH[:, self.d_ff:] if self.gated else act(h_NH)
        return torch.addmm(self.b_down_ED[e], a_NF, self.w_down_EDF[e].t())

    def forward(self, x_TD: Tensor, plan: DispatchPlan, backend: str | None = None) -> Tensor:
        """``plan.combine`` of every expert on its rows; ``backend`` is accepted and ignored (one implementation:
        the readable loop, which every backend of the stacked FFN experts is checked against)."""
        x_ND = plan.gather(x_TD)
        outs, start = [], 0
        for e, n in enumerate(plan.counts_E.tolist()):
            if n:
                outs.append(self.expert(e, x_ND[start:start + n]))
            start += n
        y_ND = torch.cat(outs) if outs else x_ND.new_zeros(0, self.d_model)
        return plan.combine(y_ND)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"activation={self.cfg.activation}, gated={self.gated}, bias=True")
