"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", arXiv 2202.09368).

Experts pick tokens instead of tokens picking experts. Over the n valid tokens of the group
(padding is removed by the base class, so it is never picked and does not change n):

* ``S = softmax(x W, dim=-1)`` ``[n, E]`` (softmax over experts, as in the paper);
* per-expert capacity ``k_c = round(n * capacity_factor / E)`` (round half up), at least 1 and at most n;
  ``capacity_factor`` is the average number of experts per token (``c = 2``: "EC-CF2");
* ``G, I = topk(S^T, k_c)`` over tokens, ties broken by the lower token index; assignment ``(I[e, j], e)``
  gets weight ``G[e, j]``. A token may get 0 experts (residual only) or up to E.
* No balance loss (balance is perfect by construction); the ST-MoE z-loss is available.

The layer's ``top_k`` is not used for selection (only by the causal fallback below).

**Causality.** Selection looks at every token of the group, including future positions, so the router
refuses ``causal=True`` (:class:`~moesaic.core.errors.CausalityError`). Opt-in fallback
``causal_fallback: topk_at_eval``: the router may then be built causally; in training it still uses expert
choice over the whole group (this leaks future tokens into the routing of a decoder and is the user's
choice), and at eval it switches to token-choice top-k (the layer's ``top_k``) on the same ``S`` with weights
``S[t, e]`` (variant A), which is causal.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any, Literal

import torch
from torch import Tensor

from moesaic.core.config import rule
from moesaic.core.types import RoutingDecision
from moesaic.moe.routing import losses
from moesaic.moe.routing.aux_stats import AuxStat
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig, stable_topk


@dataclasses.dataclass
class ExpertChoiceRouterConfig(RouterConfig):
    capacity_factor: float = rule(2.0, gt=0.0)
    causal_fallback: Literal["error", "topk_at_eval"] = "error"


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """``k_c = round(n * c / E)`` (half up), clamped to ``[1, n]``; 0 when there are no tokens."""
    if num_tokens == 0:
        return 0
    exact = Fraction(repr(float(capacity_factor))) * num_tokens / num_experts  # 0.55 is 11/20, not a float
    return min(num_tokens, max(1, math.floor(exact + Fraction(1, 2))))


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its top k_c = round(n c / E) tokens; not causal."""

    Config = ExpertChoiceRouterConfig
    cfg: ExpertChoiceRouterConfig
    causal_ok = False
    causal_hint = " (set causal_fallback: topk_at_eval to use token-choice top-k at eval instead)"

    @classmethod
    def causal_allowed(cls, cfg: ExpertChoiceRouterConfig) -> bool:  # type: ignore[override]
        return cfg.causal_fallback == "topk_at_eval"

    def route(self, x_TD: Tensor, **ctx: Any) -> RoutingDecision:
        cfg, E = self.cfg, self.num_experts
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(-1)
        stats: dict[str, AuxStat] = {}
        if cfg.z_loss_coef > 0:
            stats["z"] = losses.z_loss(logits_TE)
        if self.causal and not self.training:  # opt-in fallback: token choice on the same scores
            _, ids_TK = stable_topk(probs_TE.detach(), self.top_k)
            return RoutingDecision.from_topk(ids_TK, probs_TE.gather(1, ids_TK), E, probs_TE=probs_TE,
                                             logits_TE=logits_TE, aux_stats=stats)
        T = x_TD.shape[0]
        k_c = expert_capacity(T, E, cfg.capacity_factor)
        _, tok_EC = stable_topk(probs_TE.detach().t(), k_c)  # [E, k_c] token indices
        w_EC = probs_TE.t().gather(1, tok_EC)
        expert_idx_N = torch.arange(E, device=x_TD.device).repeat_interleave(k_c)
        return RoutingDecision(tok_EC.reshape(-1), expert_idx_N, w_EC.reshape(-1), T, E, probs_TE=probs_TE,
                               logits_TE=logits_TE, aux_stats=stats)
