"""Imported through the ``moesaic.plugins`` entry point: registers the router ``plugin_lowest``."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from moesaic.core.types import RoutingDecision
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig, stable_topk


@dataclasses.dataclass
class LowestRouterConfig(RouterConfig):
    temperature: float = 1.0


@ROUTERS.register("plugin_lowest")
class LowestRouter(Router):
    """Plugin test router: the k experts of LOWEST score, softmax weights over them."""

    Config = LowestRouterConfig
    cfg: LowestRouterConfig

    def route(self, x_TD: Tensor, **ctx: Any) -> RoutingDecision:
        logits_TE = -self.logits(x_TD) / self.cfg.temperature
        _, ids_TK = stable_topk(logits_TE.detach(), self.top_k)
        w_TK = torch.softmax(logits_TE.gather(1, ids_TK), -1)
        return RoutingDecision.from_topk(ids_TK, w_TK, self.num_experts, logits_TE=logits_TE)
