"""Noisily gated top-k (Shazeer et al. 2017, "Outrageously Large Neural Networks", arXiv 1701.06538).

During training the logits get learned, input-dependent Gaussian noise
``H = x W_g + N(0, 1) * (softplus(x W_noise) + noise_eps)``; at eval (or with ``noisy: false``) ``H = x W_g``.
Gates are variant C: ``G = softmax(KeepTopK(H, k))``. Losses (unweighted in the decision, weighted by
``importance_coef`` / ``load_coef``):

* ``importance = CV^2(sum_t G[t, :])``;
* ``load = CV^2(sum_t P[t, :])`` with the smooth load ``P[t, e]`` of :func:`smooth_load_prob` while
  noise is on; without noise the load is the (non-differentiable) count of ``G > 0``. Skipped when ``E == k``.

``CV^2`` uses the population variance (TF original); ``unbiased: true`` gives fastmoe's ``x.var()``.
``W_g`` and ``W_noise`` start at zero (the paper's init), so routing starts uniform and noise breaks ties.
``aux_loss_coef`` is not used by this router: its two losses have their own coefficients.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.config import rule
from moesaic.core.errors import RoutingInputError
from moesaic.core.types import RoutingDecision
from moesaic.moe.routing import losses
from moesaic.moe.routing.aux_stats import AuxStat
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig, router_dtype, stable_topk


def smooth_load_prob(clean_TE: Tensor, noisy_TE: Tensor, sigma_TE: Tensor | float, k: int) -> Tensor:
    """Shazeer et al. (2017) smooth load ``P[t, e]`` (Appendix A): the probability that e stays in the top k of
    row t when only e's noise is drawn again. Also the load of ShiftAddViT's latency-aware loss.

    ``thr_in`` is the (k+1)-th and ``thr_out`` the k-th largest noisy value of the row; for e in the top k,
    ``P = Phi((clean - thr_in) / sigma)``, otherwise ``Phi((clean - thr_out) / sigma)``. Needs ``E > k``.
    """
    E = noisy_TE.shape[1]
    if E <= k:
        raise RoutingInputError(f"the smooth load needs num_experts > k (got num_experts={E}, k={k})")
    top = torch.sort(noisy_TE, dim=-1, descending=True, stable=True)
    vals_TK1, idx_TK = top.values[:, : k + 1], top.indices[:, :k]
    thr_in_T1, thr_out_T1 = vals_TK1[:, k:k + 1], vals_TK1[:, k - 1:k]
    in_top_TE = torch.zeros_like(noisy_TE, dtype=torch.bool).scatter_(1, idx_TK, True)
    p_in_TE = torch.special.ndtr((clean_TE - thr_in_T1) / sigma_TE)
    p_out_TE = torch.special.ndtr((clean_TE - thr_out_T1) / sigma_TE)
    return torch.where(in_top_TE, p_in_TE, p_out_TE)


@dataclasses.dataclass
class NoisyTopKRouterConfig(RouterConfig):
    noisy: bool = True
    noise_eps: float = rule(1e-2, ge=0.0)
    importance_coef: float = rule(0.1, ge=0.0)
    load_coef: float = rule(0.1, ge=0.0)
    unbiased: bool = False
    init_std: float = rule(0.0, ge=0.0)


@ROUTERS.register("noisy_topk")
class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017): learned Gaussian noise, softmax over the top k, CV^2 losses."""

    Config = NoisyTopKRouterConfig
    cfg: NoisyTopKRouterConfig

    def __init__(self, cfg: NoisyTopKRouterConfig, d_model: int, num_experts: int, top_k: int, **kw: Any):
        super().__init__(cfg, d_model, num_experts, top_k, **kw)
        self.w_noise = nn.Parameter(torch.empty(num_experts, d_model))  # [E, D] like the gate weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "w_noise"):  # the base constructor calls this before w_noise exists
            nn.init.normal_(self.w_noise, std=self.cfg.init_std)

    def noise_std(self, x_TD: Tensor) -> Tensor:
        """``softplus(x W_noise) + noise_eps``, ``[T, E]``, in the router dtype."""
        dt = router_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            raw_TE = nn.functional.linear(x_TD.to(dt), self.w_noise.to(dt))
        return nn.functional.softplus(raw_TE) + self.cfg.noise_eps

    def route(self, x_TD: Tensor, **ctx: Any) -> RoutingDecision:
        cfg, E, k = self.cfg, self.num_experts, self.top_k
        clean_TE = self.logits(x_TD)
        use_noise = self.training and cfg.noisy
        if use_noise:
            sigma_TE = self.noise_std(x_TD)
            noisy_TE = clean_TE + torch.randn_like(clean_TE) * sigma_TE
        else:
            noisy_TE = clean_TE
        _, ids_TK = stable_topk(noisy_TE.detach(), k)
        w_TK = noisy_TE.gather(1, ids_TK).softmax(-1)  # variant C
        gates_TE = torch.zeros_like(noisy_TE).scatter(1, ids_TK, w_TK)

        stats: dict[str, AuxStat] = {}
        if cfg.importance_coef > 0:
            stats["importance"] = losses.CV2(gates_TE.sum(0), cfg.unbiased)
        if cfg.load_coef > 0 and E > k:
            if use_noise:
                load_E = smooth_load_prob(clean_TE, noisy_TE, sigma_TE, k).sum(0)
            else:
                load_E = torch.bincount(ids_TK.reshape(-1), minlength=E).to(clean_TE.dtype)
            stats["load"] = losses.CV2(load_E, cfg.unbiased)
        if cfg.z_loss_coef > 0:
            stats["z"] = losses.z_loss(clean_TE)
        return RoutingDecision.from_topk(ids_TK, w_TK, E, probs_TE=clean_TE.softmax(-1), logits_TE=clean_TE,
                                         aux_stats=stats)

    def loss_coefs(self) -> dict[str, float]:
        return {"importance": self.cfg.importance_coef, "load": self.cfg.load_coef, "z": self.cfg.z_loss_coef}
