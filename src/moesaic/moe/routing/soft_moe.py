"""Soft MoE (Puigcerver et al. 2024, "From Sparse to Soft Mixtures of Experts"; reference
google/dopamine ``labs/moes/architectures/softmoe.py``, flaxformer ``SoftRouter``).

Not token choice: each of the ``n * p`` slots (``p = slots_per_expert`` per expert) is a convex
combination of the tokens of one sequence, and each token's output a convex combination of the slot
outputs. This router computes the token-slot logits ``L = X @ Phi^T`` (``[T, n*p]``; with
``normalize: true``, ``X`` and every ``Phi`` row are L2-normalised and ``Phi`` scaled by a learned scalar
initialised to 1, the dopamine flag, off by default); the paired ``soft`` dispatcher
(:mod:`moesaic.moe.dispatch.soft`) takes the softmax over the tokens of each sequence (dispatch) and over
the slots (combine). No dropping, no aux loss. Padding tokens get no dispatch weight and output 0.
A slot sees every token of its sequence, including future ones, so causal use raises
:class:`~moesaic.core.errors.CausalityError`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.config import rule
from moesaic.core.types import RoutingDecision
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig, check_finite, router_dtype


@dataclasses.dataclass
class SoftMoERouterConfig(RouterConfig):
    """``slots_per_expert`` p; ``normalize`` = the L2 normalisation of X and Phi with a learned scale."""

    slots_per_expert: int = rule(1, ge=1)
    normalize: bool = False
    aux_loss_coef: float = 0.0


@ROUTERS.register("soft_moe")
class SoftMoERouter(Router):
    """Soft MoE: slots are softmax-weighted mixes of a sequence's tokens (Puigcerver et al. 2024); non-causal."""

    Config = SoftMoERouterConfig
    cfg: SoftMoERouterConfig
    has_weight = False
    causal_ok = False
    requires_dispatcher = "soft"

    def __init__(self, cfg: SoftMoERouterConfig, d_model: int, num_experts: int, top_k: int, **kw: Any):
        super().__init__(cfg, d_model, num_experts, top_k, **kw)
        self.phi_SD = nn.Parameter(torch.empty(num_experts * cfg.slots_per_expert, d_model))
        nn.init.normal_(self.phi_SD, std=cfg.init_std)
        if cfg.normalize:
            self.scale = nn.Parameter(torch.ones(()))

    def slot_logits(self, x_TD: Tensor) -> Tensor:
        """Token-slot logits ``[T, n*p]`` in fp32 (fp64 for fp64 input), outside autocast."""
        dt = router_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x, phi = x_TD.to(dt), self.phi_SD.to(dt)
            if self.cfg.normalize:
                x = nn.functional.normalize(x, dim=-1, eps=1e-6)
                phi = self.scale.to(dt) * nn.functional.normalize(phi, dim=-1, eps=1e-6)
            return x @ phi.t()

    def forward(self, x_TD: Tensor, mask_T: Tensor | None = None, seq_ids_T: Tensor | None = None,
                **ctx: Any) -> RoutingDecision:
        T, dev = x_TD.shape[0], x_TD.device
        if mask_T is None:
            check_finite(x_TD, self.layer_name)
            mask_T = torch.ones(T, dtype=torch.bool, device=dev)
        else:
            # Padding may hold anything, NaN and inf included, as for every other router: only valid rows
            # are checked, and zeroed padding gives finite logits that the soft dispatcher masks out.
            mask_T = mask_T.reshape(-1).bool()
            check_finite(x_TD[mask_T], self.layer_name)
            x_TD = x_TD.masked_fill(~mask_T[:, None], 0.0)
        seq_T = torch.zeros(T, dtype=torch.long, device=dev) if seq_ids_T is None else seq_ids_T.reshape(-1)
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return RoutingDecision(
            empty, empty, x_TD.new_zeros(0, dtype=router_dtype(x_TD)), T, self.num_experts,
            num_valid_tokens=int(mask_T.sum()),
            extra={"logits_TS": self.slot_logits(x_TD), "mask_T": mask_T, "seq_T": seq_T,
                   "slots_per_expert": torch.tensor(self.cfg.slots_per_expert)})

    def route(self, x_TD: Tensor, **ctx: Any) -> RoutingDecision:
        return self.forward(x_TD, **ctx)
