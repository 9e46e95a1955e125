"""FFN experts with stacked weights: gated (SwiGLU, GeGLU; Shazeer 2020) and plain MLP (GELU, ReLU, SiLU).

``w_up_EHD`` is ``[E, H, D]`` with ``H = 2F`` for gated experts (gate rows, then up rows: the layout of
Hugging Face's fused ``gate_up_proj``) and ``H = F`` for plain ones; ``w_down_EDF`` is ``[E, D, F]``.
Fine-grained segmentation (DeepSeekMoE) is a layer option: it builds m times more experts of width F/m.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.activations import Activation
from moesaic.core.config import require, rule
from moesaic.core.types import DispatchPlan
from moesaic.moe.experts.backends import BACKENDS, resolve_backend
from moesaic.moe.experts.backends.active import ExpertViews, expert_views
from moesaic.moe.experts.base import EXPERTS, Experts, ExpertsConfig
from moesaic.moe.experts.kernels import StackedFFN


@dataclasses.dataclass
class GLUExpertsConfig(ExpertsConfig):
    activation: Activation = "silu"
    backend: str = "auto"
    init_std: float | None = rule(None, gt=0.0)

    def validate(self, path: str) -> None:
        require(self.backend == "auto" or self.backend in BACKENDS, f"{path}.backend", self.backend,
                f"must be auto or one of {', '.join(BACKENDS.names())}")


@dataclasses.dataclass
class MLPExpertsConfig(GLUExpertsConfig):
    activation: Activation = "gelu"


def add_stacked_ffn(module: nn.Module, num_experts: int, d_model: int, d_ff: int, gated: bool) -> None:
    """Create ``module.w_up_EHD`` ``[E, H, D]`` and ``module.w_down_EDF`` ``[E, D, F]`` (uninitialised)."""
    H = 2 * d_ff if gated else d_ff
    module.w_up_EHD = nn.Parameter(torch.empty(num_experts, H, d_model))
    module.w_down_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))


def init_stacked_ffn(module: nn.Module, init_std: float | None) -> tuple[float, float]:
    """Normal init with std ``init_std`` or 1/sqrt(fan_in) per projection; returns the two stds."""
    w_up, w_down = module.w_up_EHD, module.w_down_EDF
    assert isinstance(w_up, Tensor) and isinstance(w_down, Tensor)
    std_in = init_std or 1.0 / math.sqrt(w_up.shape[-1])
    std_out = init_std or 1.0 / math.sqrt(w_down.shape[-1])
    nn.init.normal_(w_up, std=std_in)
    nn.init.normal_(w_down, std=std_out)
    return std_in, std_out


class FFNExperts(Experts):
    """Stacked FFN experts computed by a named backend (:mod:`moesaic.moe.experts.backends`)."""

    cfg: GLUExpertsConfig
    gated = True
    w_up_EHD: nn.Parameter
    w_down_EDF: nn.Parameter

    def __init__(self, cfg: GLUExpertsConfig, d_model: int, d_ff: int, num_experts: int, **kw: Any):
        super().__init__(cfg, d_model, d_ff, num_experts)
        add_stacked_ffn(self, num_experts, d_model, d_ff, self.gated)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_stacked_ffn(self, self.cfg.init_std)

    def ffn(self) -> StackedFFN:
        return StackedFFN(self.w_up_EHD, self.w_down_EDF, self.cfg.activation, self.gated)

    def one_token_ffn(self, x_TD: Tensor, num_rows: int) -> StackedFFN | None:
        """The weights when this module would compute one token's ``num_rows`` distinct experts with the
        ``active`` backend's :func:`~moesaic.moe.experts.backends.active.token_experts` (CPU, no autograd, the
        weights' dtype): a decode step may then call it without building a plan. None otherwise (subclasses
        with their own forward, other backends)."""
        if (type(self).forward is not FFNExperts.forward or x_TD.device.type != "cpu" or torch.is_grad_enabled()
                or resolve_backend(self.cfg.backend, num_rows, self.num_experts) != "active"
                or x_TD.dtype != self.w_up_EHD.dtype or torch.is_autocast_enabled("cpu")):
            return None
        return self.ffn()

    def one_token_views(self, ffn: StackedFFN) -> ExpertViews:
        """:func:`~moesaic.moe.experts.backends.active.expert_views` of ``ffn`` (this module's :meth:`one_token_ffn`),
        made once and made again when a weight tensor, its storage or its layout changes."""
        up, down = ffn.w_up_EHD, ffn.w_down_EDF
        key = (up.data_ptr(), down.data_ptr(), up.shape, down.shape, up.stride(), down.stride(), up.dtype, down.dtype)
        got = self.__dict__.get("_views")
        if got is None or got[0] is not up or got[1] is not down or got[2] != key:
            got = self.__dict__["_views"] = (up, down, key, expert_views(ffn))
        views: ExpertViews = got[3]
        return views

    def forward(self, x_TD: Tensor, plan: DispatchPlan, backend: str | None = None) -> Tensor:
        """``y_TD`` for the plan; ``backend`` overrides the configured one for this call."""
        name = resolve_backend(backend or self.cfg.backend, plan.num_rows, self.num_experts)
        return BACKENDS.get(name).run(x_TD, plan, self.ffn())

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"activation={self.cfg.activation}, gated={self.gated}, backend={self.cfg.backend}")


@EXPERTS.register("glu")
class GLUExperts(FFNExperts):
    """Gated FFN experts: act(x W_gate) * (x W_up) W_down; SwiGLU (silu) or GeGLU (gelu)."""

    Config = GLUExpertsConfig
    gated = True


@EXPERTS.register("mlp")
class MLPExperts(FFNExperts):
    """Plain FFN experts: act(x W_up) W_down with GELU, ReLU or SiLU."""

    Config = MLPExpertsConfig
    gated = False
