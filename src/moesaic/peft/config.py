"""The LoRA-experts config: ``model.peft: {kind: lora_experts, ...}`` or ``inject_lora_experts_(model, cfg)``.

LoRA (Hu et al. 2021): ``y = W x + (alpha / r) B A x`` with ``B = 0`` at init. LoRA experts (MoLA, Gao et al.
2024; LLaVA-MoLE, Chen et al. 2024; Uni-MoE, Li et al. 2024): E such pairs per targeted layer, mixed per token
by a router over the layer input. ``num_experts: 1`` is plain LoRA.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from moesaic.core.config import require, rule
from moesaic.models.adapters import ADAPTERS, Adapter, AdapterConfig
from moesaic.moe.routing.base import RouterConfig


def default_router() -> RouterConfig:
    return dataclasses.replace(RouterConfig.for_kind("topk"), normalization="none")  # type: ignore[call-arg]


Allocation = Literal["uniform", "increasing", "decreasing", "hourglass"]


@dataclasses.dataclass
class LoRAExpertsConfig(AdapterConfig):
    """``num_experts`` / ``top_k``: one int for every layer, a list (one per layer), or with ``allocation`` the
    per-layer average of a MoLA allocation (total expert count = ``num_experts * depth``)."""

    #: Module names (or name suffixes after a dot, as in PEFT) of nn.Linear layers or 3-D stacked expert
    #: weights (moesaic ``w_up_EHD``/``w_down_EDF``, transformers ``gate_up_proj``/``down_proj``).
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])
    rank: int = rule(8, ge=1)
    alpha: float = rule(16.0, gt=0.0)
    dropout: float = rule(0.0, ge=0.0, lt=1.0)
    num_experts: int | list[int] = 1
    top_k: int | list[int] = 1
    allocation: Allocation | None = None
    #: Any registered router (``moesaic list``); its balance losses reach ``moesaic.collect_aux_losses``.
    #: Default: ``topk`` with ``normalization: none`` (the softmax probability is the weight, so a top-1 router
    #: learns from the task loss too; with ``renorm`` a top-1 weight is always 1).
    router: RouterConfig = dataclasses.field(default_factory=lambda: default_router())
    #: An always-on LoRA of the same rank beside the routed experts (shared expert).
    shared: bool = False
    #: Modules trained in full besides the adapters (a new classification head, e.g. ``[head]``).
    modules_to_save: list[str] = dataclasses.field(default_factory=list)

    def validate(self, path: str) -> None:
        require(bool(self.target_modules), f"{path}.target_modules", self.target_modules,
                "must name at least one module")
        for name, v in (("num_experts", self.num_experts), ("top_k", self.top_k)):
            vals = v if isinstance(v, list) else [v]
            require(bool(vals) and all(x >= 1 for x in vals), f"{path}.{name}", v, "every entry must be >= 1")
        if self.allocation is not None:
            require(isinstance(self.num_experts, int), f"{path}.num_experts", self.num_experts,
                    "must be one int (the per-layer average) when allocation is set")
        if isinstance(self.num_experts, int) and isinstance(self.top_k, int) and self.allocation is None:
            require(self.top_k <= self.num_experts, f"{path}.top_k", self.top_k,
                    f"must be in [1, num_experts] = [1, {self.num_experts}]")


@ADAPTERS.register("lora_experts")
class LoRAExperts(Adapter):
    """LoRA experts (E=1: plain LoRA) on the targeted layers, everything else frozen (docs/peft.md)."""

    Config = LoRAExpertsConfig

    def __call__(self, model: nn.Module) -> nn.Module:
        from moesaic.peft.inject import inject_lora_experts_

        assert isinstance(self.cfg, LoRAExpertsConfig)
        return inject_lora_experts_(model, self.cfg)
