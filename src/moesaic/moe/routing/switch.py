"""Switch Transformer top-1 routing (Fedus et al. 2021, "Switch Transformers", arXiv 2101.03961).

* Jitter (training only): the *router input* is multiplied by ``U(1 - jitter_eps, 1 + jitter_eps)``; the
  experts still see the unjittered tokens.
* ``p = softmax(x_r W)``, ``e* = argmax p`` (ties: lower index), weight ``p[e*]`` (variant A: the output
  is scaled by ``p_max``, no renormalisation).
* Aux loss ``E * sum_e f_e P_e`` on the top-1 counts before any capacity drop (1 at uniform routing, E at
  collapse); optional ST-MoE z-loss.
* Capacity and token dropping are the dispatcher's job: use ``dispatcher: {kind: capacity,
  capacity_factor: 1.25}`` (``C = ceil(cf * T / E)`` for k = 1). The layer's ``top_k`` must be 1.
* Init: truncated normal with std ``sqrt(init_scale / d_model)`` (the paper's 10x smaller scale, 0.1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.config import rule
from moesaic.core.types import RoutingDecision
from moesaic.moe.routing import losses
from moesaic.moe.routing.aux_stats import AuxStat
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig, router_dtype, stable_topk


@dataclasses.dataclass
class SwitchRouterConfig(RouterConfig):
    jitter_eps: float = rule(1e-2, ge=0.0, lt=1.0)
    aux_loss_coef: float = rule(0.01, ge=0.0)
    init_scale: float = rule(0.1, gt=0.0)


@ROUTERS.register("switch")
class SwitchRouter(Router):
    """Switch top-1 (Fedus et al. 2021): input jitter, weight p_max, Switch aux loss; capacity via dispatcher."""

    Config = SwitchRouterConfig
    cfg: SwitchRouterConfig
    required_top_k = 1

    def reset_parameters(self) -> None:
        std = math.sqrt(self.cfg.init_scale / self.d_model)
        nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)

    def route(self, x_TD: Tensor, **ctx: Any) -> RoutingDecision:
        cfg, E = self.cfg, self.num_experts
        x_r = x_TD.to(router_dtype(x_TD))
        if self.training and cfg.jitter_eps > 0:
            noise = torch.empty_like(x_r).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
            x_r = x_r * noise
        logits_TE = self.logits(x_r)
        probs_TE = logits_TE.softmax(-1)
        _, ids_T1 = stable_topk(probs_TE.detach(), 1)
        w_T1 = probs_TE.gather(1, ids_T1)

        stats: dict[str, AuxStat] = {}
        if cfg.aux_loss_coef > 0:
            counts_E = torch.bincount(ids_T1.reshape(-1), minlength=E)
            stats["balance"] = losses.SwitchBalance(probs_TE, counts_E)
        if cfg.z_loss_coef > 0:
            stats["z"] = losses.z_loss(logits_TE)
        return RoutingDecision.from_topk(ids_T1, w_T1, E, probs_TE=probs_TE, logits_TE=logits_TE, aux_stats=stats)
