"""MoE++ experts: FFN experts next to zero-computation experts (Jin et al. 2024, "MoE++: Accelerating
Mixture-of-Experts Methods with Zero-Computation Experts", arXiv 2410.07348).

The expert list follows the released ``SkyworkAI/MoE-plus-plus MoE++/moe_plus_plus_layer.py``:
``[FFN_0 .. FFN_{n-1}] + [Const_0 .. Const_{c-1}] + [Copy ..] + [Zero ..]``, so with the defaults
(2 constant, 1 copy, 1 zero) the zero expert is the last index, ``E - 1``.

* zero: ``E(x) = 0``;
* copy: ``E(x) = x``;
* constant: ``[a1, a2] = softmax(W_c x)`` with ``W_c`` ``[2, D]`` (no bias) and ``E(x) = a1 x + a2 v``, ``v``
  a learned vector initialised N(0, 1): each token mixes itself with one learned constant.

``input_scale`` multiplies every expert's input (the released code multiplies the layer input by
``top_k = 2`` in place unless Mixtral gating or ``moe_feature_no_mul_topk``; set 2.0 with the router's
``gating: release``). The caller's tensor is never modified. Route with ``router: {kind: moepp}``
whose ``zero_computation_experts`` must equal ``num_constant + num_copy + num_zero`` (checked).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.activations import Activation
from moesaic.core.config import LayerShape, require, rule
from moesaic.core.types import DispatchPlan
from moesaic.moe.experts.backends import BACKENDS, resolve_backend
from moesaic.moe.experts.base import EXPERTS, Experts, ExpertsConfig
from moesaic.moe.experts.kernels import StackedFFN
from moesaic.moe.experts.stacked_ffn import add_stacked_ffn, init_stacked_ffn
from moesaic.moe.routing.moepp import MoEPPRouterConfig


@dataclasses.dataclass
class ZeroComputationExpertsConfig(ExpertsConfig):
    activation: Activation = "silu"
    gated: bool = True
    backend: str = "auto"
    init_std: float | None = rule(None, gt=0.0)
    num_constant: int = rule(2, ge=0)
    num_copy: int = rule(1, ge=0)
    num_zero: int = rule(1, ge=0)
    input_scale: float = rule(1.0, gt=0.0)

    @property
    def num_zero_computation(self) -> int:
        return self.num_constant + self.num_copy + self.num_zero

    def validate(self, path: str) -> None:
        require(self.backend == "auto" or self.backend in BACKENDS, f"{path}.backend", self.backend,
                f"must be auto or one of {', '.join(BACKENDS.names())}")

    def validate_moe(self, path: str, layer: LayerShape) -> None:
        """Rules involving the layer: at least one FFN expert, and a matching ``moepp`` router."""
        super().validate_moe(path, layer)
        E, zc = layer.routed_experts, self.num_zero_computation
        require(E > zc, path.rsplit(".", 1)[0] + ".num_experts", E,
                f"must exceed the {zc} zero-computation experts (at least one FFN expert)")
        r = layer.router
        if isinstance(r, MoEPPRouterConfig):
            require(r.zero_computation_experts == zc, f"{path.rsplit('.', 1)[0]}.router.zero_computation_experts",
                    r.zero_computation_experts, f"must equal num_constant + num_copy + num_zero of the experts ({zc})")
            if r.gating == "release":
                require(self.num_zero >= 1, f"{path}.num_zero", self.num_zero,
                        "gating: release zeroes the weight of the last expert, which must be a zero expert")


@EXPERTS.register("moepp")
class ZeroComputationExperts(Experts):
    """MoE++ FFN experts plus zero, copy and constant zero-computation experts (Jin et al. 2024)."""

    Config = ZeroComputationExpertsConfig
    cfg: ZeroComputationExpertsConfig
    w_up_EHD: nn.Parameter
    w_down_EDF: nn.Parameter

    def __init__(self, cfg: ZeroComputationExpertsConfig, d_model: int, d_ff: int, num_experts: int, **kw: Any):
        super().__init__(cfg, d_model, d_ff, num_experts)
        self.num_ffn = num_experts - cfg.num_zero_computation
        if self.num_ffn < 1:
            raise ValueError(f"moepp experts: num_experts ({num_experts}) must exceed the "
                             f"{cfg.num_zero_computation} zero-computation experts")
        self.gated = cfg.gated
        add_stacked_ffn(self, self.num_ffn, d_model, d_ff, cfg.gated)
        self.w_const_C2D = nn.Parameter(torch.empty(cfg.num_constant, 2, d_model))
        self.v_const_CD = nn.Parameter(torch.empty(cfg.num_constant, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std_in, _ = init_stacked_ffn(self, self.cfg.init_std)
        nn.init.normal_(self.w_const_C2D, std=std_in)
        nn.init.normal_(self.v_const_CD)

    def expert_kinds(self) -> list[str]:
        c = self.cfg
        return ["ffn"] * self.num_ffn + ["constant"] * c.num_constant + ["copy"] * c.num_copy + ["zero"] * c.num_zero

    def stacked_names(self) -> list[str]:
        """The FFN experts' stacked weights (the first ``num_ffn`` experts)."""
        return ["w_up_EHD", "w_down_EDF"]

    def forward(self, x_TD: Tensor, plan: DispatchPlan, backend: str | None = None) -> Tensor:
        """Gather, the FFN experts' rows through the backend's row kernel and the zero-computation experts'
        rows here, then the plan's weighted combine (the kinds mix in one grouped row order)."""
        x_ND = plan.gather(x_TD)
        if self.cfg.input_scale != 1.0:
            x_ND = x_ND * self.cfg.input_scale  # a new tensor: the caller's input is untouched
        nF, c = self.num_ffn, self.cfg
        counts = plan.counts_E.tolist()
        n_ffn = sum(counts[:nF])
        name = resolve_backend(backend or c.backend, n_ffn, self.w_up_EHD.shape[0])
        ffn = StackedFFN(self.w_up_EHD, self.w_down_EDF, c.activation, self.gated)
        outs = [BACKENDS.get(name).rows(x_ND[:n_ffn], plan.counts_E[:nF], ffn)]
        start = n_ffn
        for e in range(nF, self.num_experts):
            x_nD = x_ND[start:start + counts[e]]
            start += counts[e]
            j = e - nF
            if j < c.num_constant:
                a_n2 = torch.softmax(x_nD @ self.w_const_C2D[j].t().to(x_nD.dtype), dim=-1)
                outs.append(a_n2[:, :1] * x_nD + a_n2[:, 1:] * self.v_const_CD[j].to(x_nD.dtype))
            elif j < c.num_constant + c.num_copy:
                outs.append(x_nD)
            else:
                outs.append(torch.zeros_like(x_nD))
        return plan.combine(torch.cat(outs, 0))

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"ffn={self.num_ffn}, constant={c.num_constant}, copy={c.num_copy}, zero={c.num_zero}, "
                f"d_model={self.d_model}, d_ff={self.d_ff}, activation={c.activation}, input_scale={c.input_scale}")
