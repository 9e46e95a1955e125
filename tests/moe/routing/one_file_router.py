"""A router defined in one file outside the package (docs/design.md, "Adding a router in one file"): one
config, one router class, and a balance loss that is a new formula, written once as a statistic. Nothing
else is edited, yet gradient accumulation and expert/data parallelism split its loss exactly
(test_one_file_router.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from moesaic.core.config import rule
from moesaic.core.types import RoutingDecision
from moesaic.moe.routing.aux_stats import AuxStat, count
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig, stable_topk


class SquaredImportance(AuxStat):
    """``E * sum_e P_e^2``, ``P_e`` the mean router probability: 1 at uniform routing, E at collapse. Not
    linear in its statistics, so a micro-batch's own value is not its share of the step's."""

    def __init__(self, probs_TE: Tensor):
        self.probs_TE = probs_TE

    def stats(self) -> dict[str, Tensor]:  # sums over tokens: they add over micro-batches and ranks
        return {"psum_E": self.probs_TE.sum(0), "T": count(self.probs_TE.shape[0], self.probs_TE)}

    def fn(self, s: Mapping[str, Tensor]) -> Tensor:  # the loss of given totals: the formula, once
        P_E = s["psum_E"] / s["T"].clamp_min(1)
        return P_E.shape[-1] * P_E.square().sum()


@dataclasses.dataclass
class TemperedRouterConfig(RouterConfig):
    temperature: float = rule(1.0, gt=0.0)
    aux_loss_coef: float = rule(0.05, ge=0.0)


@ROUTERS.register("tempered")
class TemperedRouter(Router):
    """Softmax top-k at a temperature with a squared-importance balance loss (a one-file example)."""

    Config = TemperedRouterConfig
    cfg: TemperedRouterConfig

    def route(self, x_TD: Tensor, **ctx: Any) -> RoutingDecision:
        logits_TE = self.logits(x_TD) / self.cfg.temperature
        probs_TE = logits_TE.softmax(-1)
        w_TK, ids_TK = stable_topk(probs_TE, self.top_k)
        stats: dict[str, AuxStat] = {"balance": SquaredImportance(probs_TE)} if self.cfg.aux_loss_coef > 0 else {}
        return RoutingDecision.from_topk(ids_TK, w_TK, self.num_experts, probs_TE=probs_TE, logits_TE=logits_TE,
                                         aux_stats=stats)
