"""SMoE-Dropout (Chen et al. 2023, "Sparse MoE as the New Dropout", VITA-Group/Random-MoE-as-Dropout
``custom_gate.py::CustomNaiveGate``, ``new_utils.py``).

The router is a randomly initialised ``Linear(d, E)`` **with bias**, frozen from step 0 (its parameters
have ``requires_grad = False``, so no optimizer changes them). The gate is variant C: top-k on the raw
logits, then a softmax over the k selected logits. No balance loss. The number of active experts k
follows a schedule over the training steps (``k_schedule``, e.g. ``linear_increase`` from 2 to E), and
any k in [1, E] can be set at inference with :func:`set_top_k` ("self-slimmable"); ``k = E`` is the dense
softmax mixture.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.config import ConfigError, LayerShape, require
from moesaic.core.schedules import ScheduleConfig
from moesaic.core.types import RoutingDecision
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig, router_dtype, stable_topk


@dataclasses.dataclass
class SMoEDropoutRouterConfig(RouterConfig):
    """``k_schedule``: k over the global step (None = the layer's ``top_k`` at every step); values are
    rounded to the nearest integer and must lie in [1, num_experts]. ``freeze`` keeps the random router
    fixed (the paper's ``--freeze_gate``)."""

    k_schedule: ScheduleConfig | None = None
    freeze: bool = True
    aux_loss_coef: float = 0.0

    def validate_moe(self, path: str, layer: LayerShape) -> None:
        super().validate_moe(path, layer)
        num_experts = layer.routed_experts
        s = self.k_schedule
        if s is None:
            return
        total = int(getattr(s, "total_steps", getattr(s, "decay_steps", 1000)))
        steps = sorted({0, total, 2 * total, *range(0, total + 1, max(1, total // 64))})
        for step in steps:
            k = s.value(step)
            require(1 <= round(k) <= num_experts, f"{path}.k_schedule", s.kind,
                    f"gives k = {k} at step {step}; k must be in [1, num_experts = {num_experts}]")


@ROUTERS.register("smoe_dropout")
class SMoEDropoutRouter(Router):
    """Frozen random router with bias, softmax over the top-k logits, k from a step schedule (SMoE-Dropout)."""

    Config = SMoEDropoutRouterConfig
    cfg: SMoEDropoutRouterConfig

    def __init__(self, cfg: SMoEDropoutRouterConfig, d_model: int, num_experts: int, top_k: int, **kw: Any):
        super().__init__(cfg, d_model, num_experts, top_k, **kw)
        self.bias = nn.Parameter(torch.empty(num_experts))
        self.reset_parameters()
        self.k_schedule = cfg.k_schedule.build() if cfg.k_schedule is not None else None
        self.inference_k: int | None = None  # set by set_top_k

    def reset_parameters(self) -> None:
        # nn.Linear's default init (the original's random gate): U(-1/sqrt(d), 1/sqrt(d)) for both.
        bound = 1.0 / math.sqrt(self.d_model)
        nn.init.uniform_(self.weight, -bound, bound)
        if hasattr(self, "bias"):
            nn.init.uniform_(self.bias, -bound, bound)
        for p in self.parameters(recurse=False):
            p.requires_grad_(not self.cfg.freeze)

    @property
    def current_k(self) -> int:
        """The k used by the next forward: the inference override, else the schedule, else ``top_k``."""
        if self.inference_k is not None:
            return self.inference_k
        if self.k_schedule is not None:
            return min(max(int(round(self.k_schedule.value())), 1), self.num_experts)
        return self.top_k

    def set_top_k(self, k: int | None) -> None:
        """Use ``k`` experts per token from now on (``None``: back to the schedule). Changes no parameter."""
        if k is not None and not 1 <= int(k) <= self.num_experts:
            raise ConfigError(f"{self.layer_name}.top_k", k, f"must be in [1, num_experts = {self.num_experts}]")
        self.inference_k = None if k is None else int(k)

    def logits(self, x_TD: Tensor) -> Tensor:
        dt = router_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return nn.functional.linear(x_TD.to(dt), self.weight.to(dt), self.bias.to(dt))

    def route(self, x_TD: Tensor, **ctx: Any) -> RoutingDecision:
        logits_TE = self.logits(x_TD)
        top_TK, ids_TK = stable_topk(logits_TE, self.current_k)
        w_TK = top_TK.softmax(-1)  # variant C: softmax over the selected logits
        return RoutingDecision.from_topk(ids_TK, w_TK, self.num_experts, probs_TE=logits_TE.softmax(-1),
                                         logits_TE=logits_TE)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, current_k={self.current_k}, frozen={self.cfg.freeze}"


def set_top_k(model: nn.Module, k: int | None) -> int:
    """Set k on every SMoE-Dropout router of ``model`` (``None`` restores the schedule); returns how many."""
    routers = [m for m in model.modules() if isinstance(m, SMoEDropoutRouter)]
    for r in routers:
        r.set_top_k(k)
    return len(routers)
