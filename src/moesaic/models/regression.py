"""A toy regression model around one MoE layer: the smallest end-to-end use of the layer."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import Tensor, nn

from moesaic.core.config import rule
from moesaic.models.base import MODELS, ModelConfig
from moesaic.moe.api import name_layers
from moesaic.moe.layer import MoEConfig


@dataclasses.dataclass
class RegressionModelConfig(ModelConfig):
    task: ClassVar[str] = "regression"
    d_in: int = rule(8, ge=1)
    d_model: int = rule(32, ge=1)
    d_out: int = rule(1, ge=1)
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)


@MODELS.register("moe_regression")
class RegressionModel(nn.Module):
    """x -> Linear -> (residual MoE layer) -> Linear: a toy regressor for demos and tests."""

    Config = RegressionModelConfig

    def __init__(self, cfg: RegressionModelConfig, **kw: Any):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(cfg.d_in, cfg.d_model)
        self.moe = cfg.moe.build(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_out)
        name_layers(self)

    def forward(self, x: Tensor, mask: Tensor | None = None, **ctx: Any) -> Tensor:
        """``ctx``: routing context passed to the MoE layer (``token_ids``, ``task_id``, ``domain_id``)."""
        h = self.inp(x)
        return self.out(h + self.moe(h, mask=mask, **ctx))
