"""Classes reached only by dotted path (``moesaic_test_plugin.extra:FirstExpertRouter``): nothing here is
registered by name, and the entry point does not import this module."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moesaic.core.types import RoutingDecision
from moesaic.moe.routing.base import Router, RouterConfig


class FirstExpertRouter(Router):
    """Plugin test router: every token to experts 0..k-1 with equal weights."""

    Config = RouterConfig
    has_weight = False

    def route(self, x_TD: Tensor, **ctx: Any) -> RoutingDecision:
        T, k = x_TD.shape[0], self.top_k
        ids_TK = torch.arange(k, device=x_TD.device).expand(T, k)
        w_TK = torch.full((T, k), 1.0 / k, dtype=x_TD.dtype, device=x_TD.device)
        return RoutingDecision.from_topk(ids_TK, w_TK, self.num_experts)


class NotARouter:
    """Has a Config but is no Router: looking it up as a router must fail."""

    Config = RouterConfig
