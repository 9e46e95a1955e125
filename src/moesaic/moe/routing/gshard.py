"""GShard top-2 gating (Lepikhin et al. 2020, "GShard", arXiv 2006.16668).

* ``p = softmax(z)``; ``e1 = argmax p``, ``e2 = argmax`` of p without e1 (ties: lower index).
* Variant B weights ``g1 = p1 / (p1 + p2)``, ``g2 = p2 / (p1 + p2)``.
* Random routing of the second expert (training): e2 is kept with probability ``min(1, g2 / theta)``
  (Mesh-TF/ST-MoE ``theta = 0.2``; the paper's "proportional to 2 g2" is ``theta = 0.5``). A dropped second
  choice leaves ``g1`` alone on e1, **not** renormalised to 1. At eval the second expert is always kept
  (``random_at_eval: true`` keeps the random rule).
* Aux loss ``E * sum_e f1_e P_e`` with ``f1`` from the top-1 assignments only (GShard/tutel
  ``gshard_loss``); 1 at uniform routing.
* Capacity: use the ``capacity`` dispatcher (``C = ceil(cf * 2 * T / E)``; every first choice is placed
  before any second choice). The layer's ``top_k`` must be 2.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor

from moesaic.core.config import rule
from moesaic.core.types import RoutingDecision
from moesaic.moe.routing import losses
from moesaic.moe.routing.aux_stats import AuxStat
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig, stable_topk


@dataclasses.dataclass
class GShardRouterConfig(RouterConfig):
    second_expert_policy: Literal["random", "all"] = "random"
    theta: float = rule(0.2, gt=0.0)
    random_at_eval: bool = False
    aux_loss_coef: float = rule(0.01, ge=0.0)


@ROUTERS.register("gshard")
class GShardRouter(Router):
    """GShard top-2 (Lepikhin et al. 2020): renormalised top-2, random 2nd expert, top-1 aux loss."""

    Config = GShardRouterConfig
    cfg: GShardRouterConfig
    required_top_k = 2

    def keep_second(self, g2_T: Tensor) -> Tensor:
        """Bool ``[T]``: which second choices survive random routing (all of them when it is off)."""
        cfg = self.cfg
        if cfg.second_expert_policy == "all" or not (self.training or cfg.random_at_eval):
            return torch.ones_like(g2_T, dtype=torch.bool)
        keep_prob_T = (g2_T.detach() / cfg.theta).clamp(max=1.0)
        return torch.rand_like(keep_prob_T) < keep_prob_T

    def route(self, x_TD: Tensor, **ctx: Any) -> RoutingDecision:
        cfg, E = self.cfg, self.num_experts
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(-1)
        _, ids_T2 = stable_topk(probs_TE.detach(), 2)
        p_T2 = probs_TE.gather(1, ids_T2)
        w_T2 = p_T2 / p_T2.sum(-1, keepdim=True).clamp_min(torch.finfo(p_T2.dtype).tiny)
        keep_T = self.keep_second(w_T2[:, 1])
        ids_T2 = torch.stack([ids_T2[:, 0], torch.where(keep_T, ids_T2[:, 1], -1)], dim=1)

        stats: dict[str, AuxStat] = {}
        if cfg.aux_loss_coef > 0:
            counts_E = torch.bincount(ids_T2[:, 0], minlength=E)
            stats["balance"] = losses.SwitchBalance(probs_TE, counts_E)
        if cfg.z_loss_coef > 0:
            stats["z"] = losses.z_loss(logits_TE)
        return RoutingDecision.from_topk(ids_T2, w_T2, E, probs_TE=probs_TE, logits_TE=logits_TE, aux_stats=stats)
