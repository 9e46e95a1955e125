"""ShiftAddViT latency-aware load balancing for experts of different cost (You et al. 2023, ShiftAddViT).

From the released code, ``GATECH-EIC/ShiftAddViT pvt/fmoe_new.py::NoisyGate_V2`` and ``pvt/engine.py``:

* Gate (training): ``z = x W + N(0, noise_std^2)`` with ``noise_std = 1/E``; ``p = softmax(z)``; top-k
  with the gate values ``p`` (variant A, no renormalisation). No noise at eval.
* Loss: ``Imp_e = lambda_e * sum_t G[t, e]`` (``G`` = the dense top-k gate values) and
  ``Load_e = lambda_e * sum_t P[t, e]`` where ``P`` is Shazeer's smooth probability of being in the
  top-k under the gate noise (:func:`~moesaic.moe.routing.noisy_topk.smooth_load_prob`; the hard count
  ``G > 0`` at eval or when ``k = E``);
  ``L = CV^2(Imp) + CV^2(Load)``, coefficient 0.01. Minimising it equalises ``lambda_e * n_e``, so a
  slower expert receives fewer tokens. The released engine hard-sets the loss weight to 0; here the
  coefficient is ``aux_loss_coef``.
* ``latency``: per-expert relative per-token latency ``lambda`` (ShiftAddViT hard-codes (6, 4) for the
  (multiplication, shift) experts); here any list of E positive numbers, so latencies measured by a
  profiler can be used; ``null`` means all equal, which gives the Shazeer importance + load loss. The loss is
  invariant to scaling ``lambda``. ``CV^2`` uses the unbiased variance like fastmoe (``unbiased_cv``).

After each forward, ``shift_ratio`` holds the fraction of assignments to experts other than 0 (the
code's statistic for the share of tokens sent to the cheap experts).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from moesaic.core.config import LayerShape, require, rule
from moesaic.core.types import RoutingDecision
from moesaic.moe.routing import losses
from moesaic.moe.routing.aux_stats import AuxStat, Sum
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig, stable_topk
from moesaic.moe.routing.noisy_topk import smooth_load_prob


@dataclasses.dataclass
class LatencyAwareRouterConfig(RouterConfig):
    latency: list[float] | None = None
    noise_std: float | None = rule(None, ge=0.0)  # None: 1 / num_experts (NoisyGate_V2)
    unbiased_cv: bool = True
    aux_loss_coef: float = rule(0.01, ge=0.0)

    def validate(self, path: str) -> None:
        if self.latency is not None:
            require(all(math.isfinite(v) and v > 0 for v in self.latency), f"{path}.latency", self.latency,
                    "every latency must be a finite number > 0")

    def validate_moe(self, path: str, layer: LayerShape) -> None:
        super().validate_moe(path, layer)
        num_experts = layer.routed_experts
        if self.latency is not None:
            require(len(self.latency) == num_experts, f"{path}.latency", self.latency,
                    f"must hold one latency per expert ({num_experts})")


def latency_balance(gates_TE: Tensor, load_TE: Tensor, latency_E: Tensor | None, unbiased: bool = True) -> Sum:
    """``CV^2(lambda * sum_t G) + CV^2(lambda * sum_t P)`` (ShiftAddViT; Shazeer et al. 2017 when lambda is
    constant) as a statistic: the per-expert sums of the gates and of the load."""
    return Sum(imp=losses.CV2(gates_TE.sum(0), unbiased, latency_E),
               load=losses.CV2(load_TE.sum(0), unbiased, latency_E))


@ROUTERS.register("latency_aware")
class LatencyAwareRouter(Router):
    """ShiftAddViT noisy top-k with the latency-aware CV^2 balance loss for experts of different cost."""

    Config = LatencyAwareRouterConfig
    cfg: LatencyAwareRouterConfig
    latency: Tensor

    def __init__(self, cfg: LatencyAwareRouterConfig, d_model: int, num_experts: int, top_k: int, **kw: Any):
        super().__init__(cfg, d_model, num_experts, top_k, **kw)
        lat = cfg.latency if cfg.latency is not None else [1.0] * num_experts
        self.register_buffer("latency", torch.tensor(lat, dtype=torch.float64), persistent=False)
        self.shift_ratio: Tensor | None = None

    @property
    def noise_std(self) -> float:
        return self.cfg.noise_std if self.cfg.noise_std is not None else 1.0 / self.num_experts

    def route(self, x_TD: Tensor, **ctx: Any) -> RoutingDecision:
        E, k = self.num_experts, self.top_k
        clean_TE = self.logits(x_TD)
        noisy = self.training and self.noise_std > 0
        logits_TE = clean_TE + torch.randn_like(clean_TE) * self.noise_std if noisy else clean_TE
        probs_TE = logits_TE.softmax(-1)
        w_TK, ids_TK = stable_topk(probs_TE, k)
        stats: dict[str, AuxStat] = {}
        if self.cfg.aux_loss_coef > 0:
            gates_TE = torch.zeros_like(probs_TE).scatter(1, ids_TK, w_TK)
            if noisy and k < E:
                load_TE = smooth_load_prob(clean_TE, logits_TE, self.noise_std, k)
            else:
                load_TE = (gates_TE > 0).to(gates_TE.dtype)
            lat_E = self.latency.to(gates_TE.dtype)
            stats["balance"] = latency_balance(gates_TE, load_TE, lat_E, self.cfg.unbiased_cv)
        if self.cfg.z_loss_coef > 0:
            stats["z"] = losses.z_loss(logits_TE)
        with torch.no_grad():
            self.shift_ratio = (ids_TK != 0).double().mean() if ids_TK.numel() else None
        return RoutingDecision.from_topk(ids_TK, w_TK, E, probs_TE=probs_TE, logits_TE=logits_TE, aux_stats=stats)
