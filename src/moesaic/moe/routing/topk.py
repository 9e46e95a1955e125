"""Token-choice top-k routing: Shazeer-style softmax top-k, Mixtral, Qwen-MoE, DeepSeekMoE and DeepSeek-V3.

* Scores: ``softmax`` (Shazeer et al. 2017) or ``sigmoid`` (DeepSeek-AI 2024, "DeepSeek-V3 Technical
  Report", arXiv 2412.19437).
* Weight normalisation: ``none`` (A: softmax then top-k, DeepSeekMoE, Switch), ``renorm`` (B: top-k then
  renormalise, Mixtral), ``softmax_topk`` (C: softmax over the k selected logits, Shazeer). B and C agree
  without noise.
* Group-limited routing (DeepSeek-V3): experts in ``n_groups`` groups, only the best ``topk_groups``
  groups may be picked; ``routed_scaling_factor`` multiplies the weights.
* Aux-loss-free balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3): a per-expert bias added to
  the scores *for selection only*, moved by ``bias_update_rate * sign(mean load - load)`` once per
  optimizer step from the loads of the whole step.
* Losses: ``balance_loss`` = ``switch`` (expert-level, f over all k choices; = DeepSeekMoE expert-level),
  ``sequence`` (DeepSeek-V3 sequence-wise; its f counts the top-K of the unbiased scores over all routed
  experts, Eq. 18, even when a bias or a group limit selects) or ``none``; optional device-level loss
  over ``device_groups``; the ST-MoE z-loss.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from moesaic.core.config import LayerShape, require, rule
from moesaic.core.types import RoutingDecision
from moesaic.moe.routing import losses
from moesaic.moe.routing.aux_stats import AuxStat
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig, stable_topk


@dataclasses.dataclass
class TopKRouterConfig(RouterConfig):
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    normalization: Literal["none", "renorm", "softmax_topk"] = "renorm"
    n_groups: int = rule(1, ge=1)
    topk_groups: int = rule(1, ge=1)
    routed_scaling_factor: float = rule(1.0, gt=0.0)
    expert_bias: bool = False
    bias_update_rate: float = rule(1e-3, ge=0.0)
    balance_loss: Literal["switch", "sequence", "none"] = "switch"
    device_groups: int = rule(1, ge=1)
    device_loss_coef: float = rule(0.0, ge=0.0)
    aux_loss_coef: float = rule(0.01, ge=0.0)

    def validate(self, path: str) -> None:
        if self.score_func == "sigmoid":
            require(self.normalization != "softmax_topk", f"{path}.normalization", self.normalization,
                    "softmax_topk needs score_func: softmax")

    def validate_moe(self, path: str, layer: LayerShape) -> None:
        super().validate_moe(path, layer)
        num_experts, top_k = layer.routed_experts, layer.routed_top_k
        require(num_experts % self.n_groups == 0, f"{path}.n_groups", self.n_groups,
                f"must divide num_experts ({num_experts})")
        require(self.topk_groups <= self.n_groups, f"{path}.topk_groups", self.topk_groups,
                f"must be <= n_groups ({self.n_groups})")
        per_group = num_experts // self.n_groups
        require(top_k <= self.topk_groups * per_group, f"{path}.topk_groups", self.topk_groups,
                f"topk_groups * experts per group ({per_group}) must be >= top_k ({top_k})")
        require(num_experts % self.device_groups == 0, f"{path}.device_groups", self.device_groups,
                f"must divide num_experts ({num_experts})")


@ROUTERS.register("topk")
class TopKRouter(Router):
    """Token-choice top-k: softmax or sigmoid scores, A/B/C weights, groups, aux-loss-free bias."""

    Config = TopKRouterConfig
    cfg: TopKRouterConfig
    expert_bias: Tensor  # buffers, present with cfg.expert_bias
    step_load: Tensor

    def __init__(self, cfg: TopKRouterConfig, d_model: int, num_experts: int, top_k: int, **kw: Any):
        super().__init__(cfg, d_model, num_experts, top_k, **kw)
        if top_k == 1 and num_experts > 1 and cfg.normalization != "none":
            warnings.warn(f"topk router with top_k=1 and normalization={cfg.normalization!r}: the weight is always 1, "
                          "so the router learns only from aux losses (Megatron #894); normalization: none gives "
                          "the Switch p_max weight", stacklevel=2)
        if cfg.expert_bias:
            # A buffer, not a parameter: never seen by the optimizer or weight decay.
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
            self.register_buffer("step_load", torch.zeros(num_experts, dtype=torch.float64))
        #: Replaced by expert parallelism to sum the step load over all ranks before the bias update.
        self.reduce_load: Callable[[Tensor], Tensor] = lambda t: t

    # ---------------------------------------------------------------------------------- selection
    def _select(self, scores_TE: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The chosen ids and their selection scores (the scores themselves without a bias or groups)."""
        cfg = self.cfg
        sel_TE = scores_TE
        if cfg.expert_bias:
            sel_TE = scores_TE.detach() + self.expert_bias.to(scores_TE.dtype)
        if cfg.n_groups > 1:
            T, E = sel_TE.shape
            g_TGE = sel_TE.view(T, cfg.n_groups, E // cfg.n_groups)
            if cfg.expert_bias:  # DeepSeek-V3: sum of the top-2 biased scores of each group
                group_TG = g_TGE.topk(min(2, g_TGE.shape[-1]), dim=-1).values.sum(-1)
            else:
                group_TG = g_TGE.amax(-1)
            _, keep_TG = stable_topk(group_TG, cfg.topk_groups)
            allowed_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, keep_TG, True)
            sel_TE = sel_TE.masked_fill(~allowed_TG.repeat_interleave(E // cfg.n_groups, dim=1), float("-inf"))
        return stable_topk(sel_TE.detach() if sel_TE.requires_grad else sel_TE, k)

    def choose(self, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(logits_TE, scores_TE, ids_TK, w_TK)``: the scores, the chosen experts and their weights."""
        cfg, k = self.cfg, self.top_k
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.softmax(-1) if cfg.score_func == "softmax" else logits_TE.sigmoid()
        sel_TK, ids_TK = self._select(scores_TE, k)
        if cfg.normalization == "softmax_topk":
            w_TK = logits_TE.gather(1, ids_TK).softmax(-1)
        else:  # the selected scores are these values (a copy), unless a bias or a group limit selected
            plain = not cfg.expert_bias and cfg.n_groups == 1 and not scores_TE.requires_grad
            w_TK = sel_TK if plain else scores_TE.gather(1, ids_TK)
            if cfg.normalization == "renorm":
                w_TK = w_TK / w_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(w_TK.dtype).tiny)
        if cfg.routed_scaling_factor != 1.0:
            w_TK = w_TK * cfg.routed_scaling_factor
        return logits_TE, scores_TE, ids_TK, w_TK

    def decision(self, logits_TE: Tensor, scores_TE: Tensor, ids_TK: Tensor, w_TK: Tensor,
                 seq_ids_T: Tensor | None = None, count_now: bool = True) -> RoutingDecision:
        """The decision of a :meth:`choose` result, with the aux-loss statistics. ``count_now``: count the
        load now (and into the aux-loss-free bias load when training); else only if a statistic is read."""
        cfg, E, k = self.cfg, self.num_experts, self.top_k

        def count_E() -> Tensor:
            return torch.bincount(ids_TK.reshape(-1), minlength=E)

        counts_E: Tensor | Callable[[], Tensor] = count_E
        if count_now:
            counts_E = count_E()
            if cfg.expert_bias and self.training:
                self.step_load += counts_E.to(self.step_load.dtype)
        stats: dict[str, AuxStat] = {}
        probs_TE = scores_TE if cfg.score_func == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
        if cfg.aux_loss_coef > 0 and cfg.balance_loss == "switch":
            stats["balance"] = losses.SwitchBalance(probs_TE, counts_E)
        elif cfg.aux_loss_coef > 0 and cfg.balance_loss == "sequence":
            # DeepSeek-V3 Eq. 18 counts f over the top-K of the unbiased scores of all routed experts; the
            # routing choice equals it only without a bias and without a group limit.
            plain = not cfg.expert_bias and cfg.n_groups == 1
            f_ids_TK = ids_TK if plain else stable_topk(scores_TE.detach(), k)[1]
            seq_T = seq_ids_T if seq_ids_T is not None else torch.zeros(ids_TK.shape[0], dtype=torch.long,
                                                                         device=ids_TK.device)
            stats["balance"] = losses.SequenceBalance(scores_TE, f_ids_TK, seq_T)
        if cfg.device_loss_coef > 0:
            stats["device_balance"] = losses.DeviceBalance(probs_TE, counts_E, cfg.device_groups)
        if cfg.z_loss_coef > 0:
            stats["z"] = losses.z_loss(logits_TE)
        return RoutingDecision.from_topk(ids_TK, w_TK, E, ids_nonnegative=True, probs_TE=scores_TE,
                                         logits_TE=logits_TE, aux_stats=stats)

    def route(self, x_TD: Tensor, seq_ids_T: Tensor | None = None, **ctx: Any) -> RoutingDecision:
        # decoding (no grad, eval) counts the load only if a statistic is read
        return self.decision(*self.choose(x_TD), seq_ids_T, count_now=self.training or torch.is_grad_enabled())

    def loss_coefs(self) -> dict[str, float]:
        return {**super().loss_coefs(), "device_balance": self.cfg.device_loss_coef}

    def uses_seq_ids(self) -> bool:
        return self.cfg.aux_loss_coef > 0 and self.cfg.balance_loss == "sequence"

    @torch.no_grad()
    def on_optimizer_step(self, step: int) -> None:
        if not (self.cfg.expert_bias and self.training):
            return
        load_E = self.reduce_load(self.step_load.clone())
        if load_E.sum() > 0:
            step_E = torch.sign(load_E.mean() - load_E).to(self.expert_bias.dtype)
            self.expert_bias += self.cfg.bias_update_rate * step_E
        self.step_load.zero_()
