"""EvoMoE dense-to-sparse (DTS) Gumbel gate with a temperature schedule (Nie et al. 2021, arXiv 2112.14397).

From the released code, ``codecaution/EvoMoE fairseq/modules/moe/topkgate.py`` (``topkgating``):

* ``g = softmax((z + Gumbel(0, 1)) / tau)`` (``F.gumbel_softmax(z, tau, hard=False)``), ``z = x W``.
* Soft phase: the selected set is ``S_t = {e : g[t, e] > threshold}`` (0.001), so the number of experts
  per token varies and shrinks as ``tau`` falls. Weights ``g * 1[S_t]`` (``use_gumbel_gates``) or
  ``softmax(z) * 1[S_t]``, not renormalised. Dropless (the code's capacity is T).
* Hard phase (``step >= hard_from_step``; the code's ``switch_to_hard_gumbel_softmax``): one expert,
  ``argmax_e g[t, e]`` (a Gumbel sample, so still stochastic), weight as above. The code's default -1
  means hard from step 0; here ``null`` (default) never switches and ``-1`` reproduces the code.
* Eval: deterministic top-1 on ``z`` with weight ``softmax(z)`` at that expert and no drops (the
  code's ``top1gating`` with capacity factor E), unless ``dense_validate`` (the training gate).
* Aux loss (``balance``, :class:`GateUsageBalance`): ``me_e = mean_t w[t, e]``, ``ce_e = mean_t 1[e in S_t]``,
  ``L = E^2 mean_e(me_e ce_e) = E sum_e me_e ce_e``; gradient through ``me``. It equals 1 at uniform
  top-1 routing with weight 1 and ``E`` when every token keeps every expert with weight ``1/E``.
* When ``threshold >= max_e g`` (possible for ``E > 1/threshold``) a token would have no expert;
  ``keep_argmax`` (default) keeps its argmax, so every token reaches at least one expert.
* Temperature: any step schedule (``moesaic.core.schedules``), default ``exp_decay`` from 2.0 to 0.3 (paper
  scale; the code's config defaults are 1.0 -> 0.5); it is a submodule whose step buffer is saved in
  the state dict and advanced by :func:`moesaic.on_optimizer_step`; the hard-phase switch reads the
  same step.

Phase 1 of EvoMoE (``dense_until_step: S``): before step S every token goes to expert 0 with weight 1,
in training and eval; with ``experts: {kind: evomoe, diversify_step: S}`` expert 0 is then diversified
into all experts and the DTS gate takes over (its temperature schedule counts from step 0).

``top_k`` of the layer is not used by this router (experts per token vary); capacity dispatchers
should not be combined with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from moesaic.core.config import rule
from moesaic.core.schedules import ExpDecayScheduleConfig, ScheduleConfig
from moesaic.core.types import RoutingDecision
from moesaic.moe.routing import losses
from moesaic.moe.routing.aux_stats import AuxStat, count
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig, stable_topk


def _default_temperature() -> ScheduleConfig:
    return ExpDecayScheduleConfig(max_value=2.0, min_value=0.3, decay_steps=1000)


@dataclasses.dataclass
class DTSRouterConfig(RouterConfig):
    temperature: ScheduleConfig = dataclasses.field(default_factory=_default_temperature)
    threshold: float = rule(0.001, ge=0.0, lt=1.0)
    use_gumbel_gates: bool = True
    hard_from_step: int | None = rule(None, ge=-1)
    dense_validate: bool = False
    keep_argmax: bool = True
    dense_until_step: int | None = rule(None, ge=0)
    aux_loss_coef: float = rule(0.01, ge=0.0)


class GateUsageBalance(AuxStat):
    """EvoMoE balance ``E^2 * mean_e(mean_t w[t, e] * mean_t 1[e selected for t])`` (the code's ``me * ce``
    loss). Statistics: the per-expert sums of the weights and of the selections, and the tokens."""

    def __init__(self, w_TE: Tensor, sel_TE: Tensor):
        self.w_TE, self.sel_TE = w_TE, sel_TE

    def stats(self) -> dict[str, Tensor]:
        w = self.w_TE
        return {"wsum_E": w.sum(0), "selsum_E": self.sel_TE.detach().to(w.dtype).sum(0), "T": count(w.shape[0], w)}

    def fn(self, s: Mapping[str, Tensor]) -> Tensor:
        T, E = s["T"].clamp_min(1), s["wsum_E"].shape[-1]
        return ((s["wsum_E"] / T) * (s["selsum_E"] / T)).mean() * E * E


@ROUTERS.register("dts")
class DTSRouter(Router):
    """EvoMoE dense-to-sparse Gumbel gate: experts above a threshold, temperature annealed (Nie et al. 2021)."""

    Config = DTSRouterConfig
    cfg: DTSRouterConfig

    def __init__(self, cfg: DTSRouterConfig, d_model: int, num_experts: int, top_k: int, **kw: Any):
        super().__init__(cfg, d_model, num_experts, top_k, **kw)
        self.temperature = cfg.temperature.build()  # holds the step (saved; advanced by on_optimizer_step)

    @property
    def tau(self) -> float:
        return float(self.temperature.value())

    def hard(self) -> bool:
        h = self.cfg.hard_from_step
        return h is not None and int(self.temperature.current_step) >= h

    def route(self, x_TD: Tensor, **ctx: Any) -> RoutingDecision:
        cfg, E = self.cfg, self.num_experts
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(-1)
        T = x_TD.shape[0]
        if cfg.dense_until_step is not None and self.temperature.current_step < cfg.dense_until_step:
            # EvoMoE phase 1: one expert trained alone (experts kind evomoe diversifies it at that step)
            ids_T1 = torch.zeros(T, 1, dtype=torch.long, device=x_TD.device)
            return RoutingDecision.from_topk(ids_T1, probs_TE.new_ones(T, 1), E, probs_TE=probs_TE,
                                             logits_TE=logits_TE, aux_stats=self._z(logits_TE))
        if not self.training and not cfg.dense_validate:
            w_T1, ids_T1 = stable_topk(probs_TE, 1)
            return RoutingDecision.from_topk(ids_T1, w_T1, E, probs_TE=probs_TE, logits_TE=logits_TE,
                                             aux_stats=self._z(logits_TE))
        u_TE = torch.rand_like(logits_TE).clamp(torch.finfo(logits_TE.dtype).tiny, 1.0)
        gumbel_TE = -torch.log(-torch.log(u_TE))
        g_TE = ((logits_TE + gumbel_TE) / self.tau).softmax(-1)
        with torch.no_grad():
            if self.hard():
                sel_TE = torch.zeros_like(g_TE, dtype=torch.bool).scatter_(1, g_TE.argmax(-1, keepdim=True), True)
            else:
                sel_TE = g_TE > cfg.threshold
                if cfg.keep_argmax and T:
                    sel_TE.scatter_(1, g_TE.argmax(-1, keepdim=True), True)
        w_TE = (g_TE if cfg.use_gumbel_gates else probs_TE) * sel_TE
        stats = self._z(logits_TE)
        if cfg.aux_loss_coef > 0:
            stats["balance"] = GateUsageBalance(w_TE, sel_TE)
        tok_N, exp_N = sel_TE.nonzero(as_tuple=True)
        # choice rank: experts of a token ordered by g, best first
        rank_TE = torch.argsort(torch.argsort(-g_TE.detach(), dim=-1, stable=True), dim=-1)
        return RoutingDecision(tok_N, exp_N, w_TE[tok_N, exp_N], T, E, choice_N=rank_TE[tok_N, exp_N],
                               probs_TE=probs_TE, logits_TE=logits_TE, aux_stats=stats)

    def _z(self, logits_TE: Tensor) -> dict[str, AuxStat]:
        return {"z": losses.z_loss(logits_TE)} if self.cfg.z_loss_coef > 0 else {}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tau={self.tau:.4g}, hard={self.hard()}"
