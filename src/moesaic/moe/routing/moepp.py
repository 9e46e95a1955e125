"""MoE++ router: gating residuals, zero-computation-aware gating, heterogeneous balance and capacity.

MoE++ (Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods with Zero-Computation Experts",
arXiv 2410.07348; released code
``SkyworkAI/MoE-plus-plus MoE++/moe_plus_plus_layer.py``). Use with ``experts: {kind: moepp}``: the last
``zero_computation_experts`` experts are zero-computation (ZC) experts and the very last one is the zero
expert.

* Scores: ``gate_layers: 1`` is the paper's linear router; ``2`` is the released
  ``Linear(D, 8E) -> tanh -> Linear(8E, E)``; both without bias, in fp32.
* Gating residual: ``z^l = Router^l(x^l) + W_g^l z^{l-1}`` with ``W_g`` ``[E, E]`` (``gate_map``) and
  ``z^{l-1}`` the previous MoE++ layer's logits *after* its own residual. The first layer has none. The
  previous logits come from the ``gate_residual`` routing context when the caller threads it, or from the
  router linked by :func:`link_gating_residuals` / :func:`moesaic.name_layers` (module order; every model
  of this package calls ``name_layers`` when built), so any model gets it without changes.
* ``gating``:
  - ``paper`` (default, the formulation the paper writes, which the release departs from):
    ``y = sum_selected g_i E_i(x)`` with ``p = softmax(z)``, top-k and
    ``normalization: none`` (variant A, ``g = p``) or ``renorm`` (variant B);
  - ``release``: softmax top-k, the zero expert's weight set to 0, the rest renormalised (so
    ``{FFN_i, Zero}`` gives FFN_i weight 1); pair with ``experts.input_scale: 2`` for the code's
    ``input *= top_k`` (then such a token outputs ``FFN_i(2x)``);
  - ``mixtral``: top-k on the logits, softmax over the k (variant C), no zero-expert special case.
  ``logits_norm_std`` rescales the logits to that std before gating (``moe_use_logits_norm``).
* Balance (``balance``, the paper's Eq. 7, :class:`HeteroBalance`): ``L_b = sum_i eta_i f_i P_i`` with
  ``eta = 1`` for FFN and ``tau`` for ZC experts, ``f_i`` the fraction of tokens selecting i (before
  capacity; sums to k) and ``P_i`` the mean probability; coefficient 0.01, ``tau = 0.75``. No ``E``
  factor: at ``tau = 1`` it is ``k/E`` times the Switch loss of
  :class:`~moesaic.moe.routing.losses.SwitchBalance` (exactly Switch / E for top-1), and ``k/E`` (not 1)
  at uniform routing.
* Heterogeneous capacity (``capacity_factor`` = gamma, paper 1.1; off by default; training only), with
  k included like GShard's ``C = cf * k * T / E`` (Lepikhin et al. 2020), so gamma means the same thing
  for any k: an FFN expert keeps
  ``ceil(gamma k T tau / (tau N_FFN + N_ZC))`` assignments and a ZC expert
  ``ceil(gamma k T / (tau N_FFN + N_ZC))``; first choices first, then token order; overflow is dropped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from moesaic.core.config import LayerShape, require, rule
from moesaic.core.errors import MoesaicError
from moesaic.core.types import RoutingDecision
from moesaic.moe.dispatch.capacity import slot_positions
from moesaic.moe.routing import losses
from moesaic.moe.routing.aux_stats import AuxStat
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig, router_dtype, stable_topk


@dataclasses.dataclass
class MoEPPRouterConfig(RouterConfig):
    zero_computation_experts: int = rule(4, ge=0)
    gate_layers: int = rule(1, ge=1, le=2)
    gate_hidden_mult: int = rule(8, ge=1)
    gating_residual: bool = True
    gating: Literal["paper", "release", "mixtral"] = "paper"
    normalization: Literal["none", "renorm"] = "none"
    logits_norm_std: float | None = rule(None, gt=0.0)
    tau: float = rule(0.75, gt=0.0)
    capacity_factor: float | None = rule(None, gt=0.0)
    aux_loss_coef: float = rule(0.01, ge=0.0)

    def validate_moe(self, path: str, layer: LayerShape) -> None:
        super().validate_moe(path, layer)
        num_experts = layer.routed_experts
        # <= (not <): with moepp experts, their validate_moe demands at least one FFN expert
        require(self.zero_computation_experts <= num_experts, f"{path}.zero_computation_experts",
                self.zero_computation_experts, f"must be <= num_experts ({num_experts})")


class HeteroBalance(losses.AssignmentBalance):
    """MoE++ heterogeneous load balance ``sum_i eta_i f_i P_i`` with ``f_i = counts_i / T`` and ``P_i`` the mean
    probability (Jin et al. 2024, Eq. 7; no E factor)."""

    def __init__(self, probs_TE: Tensor, counts_E: Tensor, eta_E: Tensor):
        super().__init__(probs_TE, counts_E)
        self.eta_E = eta_E

    def fn(self, s: Mapping[str, Tensor]) -> Tensor:
        T = s["T"].clamp_min(1)
        return (self.eta_E.to(T.dtype) * (s["counts_E"] / T) * (s["psum_E"] / T)).sum()


def hetero_capacity(num_tokens: int, top_k: int, num_ffn: int, num_zc: int, tau: float,
                    gamma: float) -> tuple[int, int]:
    """``(C_ffn, C_zc)``: ``gamma k T tau / (tau N_FFN + N_ZC)`` and ``gamma k T / (tau N_FFN + N_ZC)``, ceil."""
    denom = tau * num_ffn + num_zc
    return (math.ceil(gamma * top_k * num_tokens * tau / denom), math.ceil(gamma * top_k * num_tokens / denom))


@ROUTERS.register("moepp")
class MoEPPRouter(Router):
    """MoE++ router: gating residuals, zero/copy/constant-aware gating, heterogeneous balance (Jin et al. 2024)."""

    Config = MoEPPRouterConfig
    cfg: MoEPPRouterConfig
    eta: Tensor

    def __init__(self, cfg: MoEPPRouterConfig, d_model: int, num_experts: int, top_k: int, **kw: Any):
        self._hidden = cfg.gate_hidden_mult * num_experts if cfg.gate_layers == 2 else 0
        super().__init__(cfg, d_model, num_experts, top_k, **kw)
        E = num_experts
        self.num_zc = cfg.zero_computation_experts
        self.num_ffn = E - self.num_zc
        eta = torch.ones(E, dtype=torch.float64)
        eta[self.num_ffn:] = cfg.tau
        self.register_buffer("eta", eta, persistent=False)
        if cfg.gating_residual:
            self.gate_map = nn.Parameter(torch.empty(E, E))  # [E_out, E_in] like nn.Linear(E, E, bias=False)
            nn.init.kaiming_uniform_(self.gate_map, a=math.sqrt(5))  # nn.Linear's default, as in the release
        self._prev: list[MoEPPRouter] = []  # a plain list: the previous router is not a submodule
        self.last_logits: Tensor | None = None

    def reset_parameters(self) -> None:
        if self._hidden:
            if not hasattr(self, "w_hidden"):  # first call, from Router.__init__: create the 2-layer shapes
                self.w_hidden = nn.Parameter(torch.empty(self._hidden, self.d_model))
                self.weight = nn.Parameter(torch.empty(self.num_experts, self._hidden))
            nn.init.normal_(self.w_hidden, std=self.cfg.init_std)
        nn.init.normal_(self.weight, std=self.cfg.init_std)

    def logits(self, x_TD: Tensor) -> Tensor:
        if not self._hidden:
            return super().logits(x_TD)
        dt = router_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            h = torch.tanh(nn.functional.linear(x_TD.to(dt), self.w_hidden.to(dt)))
            return nn.functional.linear(h, self.weight.to(dt))

    # ------------------------------------------------------------------------------- residual
    def link_previous(self, prev: MoEPPRouter | None) -> None:
        """Take ``prev``'s post-residual logits as ``z^{l-1}`` (None: first layer, no residual)."""
        self._prev = [prev] if prev is not None else []

    def _residual_source(self, num_rows: int, ctx: dict[str, Any]) -> Tensor | None:
        src = ctx.get("gate_residual")
        if src is None and self._prev:
            src = self._prev[0].last_logits
            if src is None:
                raise MoesaicError(f"{self.layer_name}: gating residual is linked to a previous MoE++ layer that "
                                   "has not run in this forward")
        if src is not None and src.shape != (num_rows, self.num_experts):
            raise MoesaicError(f"{self.layer_name}: gating residual has shape {tuple(src.shape)}, expected "
                               f"({num_rows}, {self.num_experts}); the previous MoE++ layer saw other tokens")
        return src

    # ---------------------------------------------------------------------------------- gating
    def _gate(self, logits_TE: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg, k, E = self.cfg, self.top_k, self.num_experts
        z_TE = logits_TE
        if cfg.logits_norm_std is not None:
            z_TE = z_TE / (z_TE.std(-1, keepdim=True).clamp_min(1e-12) / cfg.logits_norm_std)
        probs_TE = z_TE.softmax(-1)
        if cfg.gating == "mixtral":
            _, ids_TK = stable_topk(z_TE.detach(), k)
            return probs_TE, ids_TK, z_TE.gather(1, ids_TK).softmax(-1)
        w_TK, ids_TK = stable_topk(probs_TE, k)
        if cfg.gating == "release":
            w_TK = torch.where(ids_TK == E - 1, torch.zeros_like(w_TK), w_TK)
            w_TK = w_TK / w_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(w_TK.dtype).tiny)
        elif cfg.normalization == "renorm":
            w_TK = w_TK / w_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(w_TK.dtype).tiny)
        return probs_TE, ids_TK, w_TK

    def route(self, x_TD: Tensor, gate_residual: Tensor | None = None, **ctx: Any) -> RoutingDecision:
        cfg, E, k = self.cfg, self.num_experts, self.top_k
        T = x_TD.shape[0]
        logits_TE = self.logits(x_TD)
        if cfg.gating_residual:
            src = self._residual_source(T, {"gate_residual": gate_residual})
            if src is None:  # first layer: no residual term; zeros keep gate_map in the graph (exact 0 grad)
                src = logits_TE.new_zeros(T, self.num_experts)
            logits_TE = logits_TE + nn.functional.linear(src.to(logits_TE.dtype), self.gate_map.to(logits_TE.dtype))
        self.last_logits = logits_TE
        probs_TE, ids_TK, w_TK = self._gate(logits_TE)
        counts_E = torch.bincount(ids_TK.reshape(-1), minlength=E)
        stats: dict[str, AuxStat] = {}
        if cfg.aux_loss_coef > 0:
            stats["balance"] = HeteroBalance(probs_TE, counts_E, self.eta)
        if cfg.z_loss_coef > 0:
            stats["z"] = losses.z_loss(logits_TE)
        d = RoutingDecision.from_topk(ids_TK, w_TK, E, probs_TE=probs_TE, logits_TE=logits_TE, aux_stats=stats)
        if cfg.capacity_factor is not None and self.training:
            c_ffn, c_zc = hetero_capacity(T, k, self.num_ffn, self.num_zc, cfg.tau, cfg.capacity_factor)
            cap_E = torch.full((E,), c_zc, dtype=torch.long, device=x_TD.device)
            cap_E[:self.num_ffn] = c_ffn
            d = d.select(slot_positions(d) < cap_E[d.expert_idx_N])
        return d


def link_gating_residuals(model: nn.Module) -> int:
    """Link every MoE++ router to the previous one in module order (the decoder's layer order), so each
    layer adds ``W_g z^{l-1}`` to its logits. Returns the number of links made. The models of this
    package do this at build time (:func:`moesaic.name_layers` calls :meth:`MoEPPRouter.link_previous`)."""
    routers = [m for m in model.modules() if isinstance(m, MoEPPRouter)]
    prev = None
    for r in routers:
        r.link_previous(prev)
        prev = r
    return max(len(routers) - 1, 0)
