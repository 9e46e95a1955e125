"""Dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE
Models", arXiv 2403.07652; ZhenweiAn/Dynamic_MoE ``top_p_sampling_batched_all_sequence``).

Each token takes the fewest experts, in order of probability, whose probabilities sum to more than
``threshold`` (strict ``>``), so ``k_t`` varies per token. The weights are the raw softmax probabilities
(variant A, no renormalisation). Losses (paper, not in the released code): the Switch balance over the
selected (token, expert) pairs, normalised by the number of selections so uniform routing gives 1, and
the dynamic loss, the mean router entropy, whose minimisation sharpens the router so fewer experts pass
the threshold.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor

from moesaic.core.config import LayerShape, require, rule
from moesaic.core.types import RoutingDecision
from moesaic.moe.routing import losses
from moesaic.moe.routing.aux_stats import AuxStat
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig


@dataclasses.dataclass
class TopPRouterConfig(RouterConfig):
    """``threshold`` p (paper 0.4); ``max_k`` caps the experts per token (an extension, not in the paper;
    None = no cap); ``aux_loss_coef`` (alpha) weighs the balance loss and ``dynamic_loss_coef`` (beta) the
    entropy loss. The defaults 1e-2 and 1e-4 are unconfirmed: the released code
    (``configuration_moe.py``) holds the threshold but no loss weights. ``balance_normalization``:
    ``selections`` (default) divides the expert counts by the number of selections, so the loss is 1 at
    uniform routing whatever k_t, like every other balance loss here; ``tokens`` divides by the number of
    tokens (the other reading of the paper: the loss then equals the mean k_t at uniform routing and also
    penalises many experts)."""

    threshold: float = rule(0.4, gt=0.0, lt=1.0)
    max_k: int | None = rule(None, ge=1)
    aux_loss_coef: float = rule(1e-2, ge=0.0)
    dynamic_loss_coef: float = rule(1e-4, ge=0.0)
    balance_normalization: Literal["selections", "tokens"] = "selections"

    def validate_moe(self, path: str, layer: LayerShape) -> None:
        super().validate_moe(path, layer)
        num_experts = layer.routed_experts
        if self.max_k is not None:
            require(self.max_k <= num_experts, f"{path}.max_k", self.max_k,
                    f"must be <= num_experts ({num_experts})")


def top_p_select(probs_TE: Tensor, threshold: float, max_k: int | None = None) -> tuple[Tensor, Tensor]:
    """``(ids_TK, w_TK)`` with ``K = max k_t``; slots past ``k_t`` hold id -1 and weight 0.

    ``k_t = min{r : cumsum(sorted p)[r-1] > threshold}``; when rounding leaves no such r, all E are taken.
    """
    T, E = probs_TE.shape
    ps_TE, idx_TE = torch.sort(probs_TE.detach(), dim=-1, descending=True, stable=True)
    cum_TE = ps_TE.cumsum(-1)
    k_T = ((cum_TE <= threshold).sum(-1) + 1).clamp(max=E if max_k is None else min(max_k, E))
    K = int(k_T.max()) if T else 1
    keep_TK = torch.arange(K, device=probs_TE.device)[None, :] < k_T[:, None]
    ids_TK = idx_TE[:, :K].masked_fill(~keep_TK, -1)
    w_TK = probs_TE.gather(1, idx_TE[:, :K]) * keep_TK.to(probs_TE.dtype)
    return ids_TK, w_TK


@ROUTERS.register("top_p")
class TopPRouter(Router):
    """Dynamic top-p: fewest experts whose probabilities exceed p, raw weights (Huang et al. 2024)."""

    Config = TopPRouterConfig
    cfg: TopPRouterConfig

    def route(self, x_TD: Tensor, **ctx: Any) -> RoutingDecision:
        cfg, E = self.cfg, self.num_experts
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(-1)
        ids_TK, w_TK = top_p_select(probs_TE, cfg.threshold, cfg.max_k)
        stats: dict[str, AuxStat] = {}
        if cfg.aux_loss_coef > 0:
            counts_E = torch.bincount(ids_TK[ids_TK >= 0], minlength=E)
            stats["balance"] = losses.SwitchBalance(probs_TE, counts_E, cfg.balance_normalization == "tokens")
        if cfg.dynamic_loss_coef > 0:
            stats["dynamic"] = losses.router_entropy(probs_TE)
        if cfg.z_loss_coef > 0:
            stats["z"] = losses.z_loss(logits_TE)
        return RoutingDecision.from_topk(ids_TK, w_TK, E, probs_TE=probs_TE, logits_TE=logits_TE, aux_stats=stats)

    def loss_coefs(self) -> dict[str, float]:
        return {**super().loss_coefs(), "dynamic": self.cfg.dynamic_loss_coef}
