"""Time-series MoE forecaster (``model: {kind: ts_forecaster}``), Time-MoE style (Shi et al. 2024,
"Time-MoE: Billion-Scale Time Series Foundation Models with Mixture of Experts"; Moirai-MoE, Liu et al.
2024): every time step is a token (point-wise embedding of its value), a causal decoder of pre-norm blocks
with MoE FFNs, and a multi-horizon head that predicts the next ``horizon`` values from every position
(trained at every position at once, like next-token prediction; the forecast is the last position's).
Inputs are instance-normalised by the data (each window by its own context).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from moesaic.core.config import rule
from moesaic.models.base import MODELS
from moesaic.models.decoder import LMOutput
from moesaic.models.norms import RMSNorm
from moesaic.models.transformer import TransformerConfig, TransformerLayer, init_weights
from moesaic.moe.api import collect_aux_losses, name_layers


@dataclasses.dataclass
class ForecasterConfig(TransformerConfig):
    task: ClassVar[str] = "forecast"
    horizon: int = rule(8, ge=1, doc="values predicted from each position")


@MODELS.register("ts_forecaster")
class TimeSeriesForecaster(nn.Module):
    """Point-wise value embedding -> causal Transformer blocks (dense or MoE) -> ``horizon`` outputs."""

    Config = ForecasterConfig

    def __init__(self, cfg: ForecasterConfig, **kw: Any):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(1, cfg.d_model)
        self.layers = nn.ModuleList([TransformerLayer(cfg, i, causal=True) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.horizon)
        init_weights(self, cfg.init_std)
        name_layers(self)

    def forward(self, past_values: Tensor, return_dict: bool = True) -> LMOutput | Tensor:
        """``past_values`` ``[B, L]`` -> predictions ``[B, L, horizon]`` (row t forecasts t+1 .. t+horizon)."""
        h_BLD = self.embed(past_values.to(self.embed.weight.dtype).unsqueeze(-1))
        B, L, _ = h_BLD.shape
        pos_BL = torch.arange(L, device=h_BLD.device).expand(B, L)
        for layer in self.layers:
            h_BLD = layer(h_BLD, pos_BL, None, None, None, None)
        pred_BLH = self.head(self.norm(h_BLD))
        if not return_dict:
            return pred_BLH
        return LMOutput(pred_BLH, None, collect_aux_losses(self), None)
