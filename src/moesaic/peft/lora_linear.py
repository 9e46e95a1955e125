"""A linear layer with a frozen weight and E LoRA experts mixed per token by a router.

``y = W x + b + (alpha / r) * sum_e g_e(x) B_e A_e drop(x)  [+ (alpha / r) B_s A_s drop(x), shared]``

LoRA (Hu et al. 2021); routed LoRA experts as in MoLA (Gao et al. 2024), LLaVA-MoLE (Chen et al. 2024) and
Uni-MoE (Li et al. 2024); the always-on shared LoRA as DeepSeekMoE's shared expert. ``g(x)`` are the combine
weights of any registered router (``RoutingDecision.dense()``), 0 outside the token's top-k; E = 1 has no
router (plain LoRA, ``g = 1``). ``B = 0`` at init, so the layer starts as the base layer exactly.

Every expert's ``A`` runs on every token (``[T, E*r]``, one matmul: ranks are small); the routing weights zero
the unselected experts before ``B``. :meth:`forward_reference` is the per-expert loop it is tested against.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.moe.routing.base import Router, RouterConfig


class PeftMergeError(ValueError):
    """Merging is exact only for plain LoRA or a fixed expert; the message names the layer."""


class LoRAExpertsLinear(nn.Module):
    """Wraps ``base`` (kept, frozen) with E LoRA pairs ``A_ERI`` ``[E, r, I]`` and ``B_EOR`` ``[E, O, r]``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, num_experts: int, top_k: int,
                 router: RouterConfig | None, shared: bool = False, name: str = "") -> None:
        super().__init__()
        self.base, self.name = base, name
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.num_experts, self.top_k = num_experts, top_k
        dev, dt = base.weight.device, base.weight.dtype
        D_out, D_in = base.weight.shape
        self.lora_A_ERI = nn.Parameter(torch.empty(num_experts, rank, D_in, device=dev, dtype=dt))
        self.lora_B_EOR = nn.Parameter(torch.zeros(num_experts, D_out, rank, device=dev, dtype=dt))
        for e in range(num_experts):  # PEFT's default init of A (kaiming-uniform, a = sqrt(5))
            nn.init.kaiming_uniform_(self.lora_A_ERI[e], a=math.sqrt(5))
        self.shared = shared
        if shared:
            self.shared_A_RI = nn.Parameter(torch.empty(rank, D_in, device=dev, dtype=dt))
            self.shared_B_OR = nn.Parameter(torch.zeros(D_out, rank, device=dev, dtype=dt))
            nn.init.kaiming_uniform_(self.shared_A_RI, a=math.sqrt(5))
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router: Router | None = None
        if num_experts > 1:
            assert router is not None
            self.router = router.build(D_in, num_experts, top_k).to(dev)
            self.router.layer_name = name
        self.fixed_expert: int | None = None
        self.merged = False
        self.aux_losses: dict[str, Tensor] = {}
        self.last_weights_TE: Tensor | None = None

    # the wrapped layer's attributes, for code that reads them (HF reads ``.weight.dtype`` in places)
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def gates(self, x_TI: Tensor) -> Tensor:
        """Combine weights ``[T, E]`` (1 for plain LoRA or a fixed expert); sets ``aux_losses``."""
        T, E = x_TI.shape[0], self.num_experts
        if self.fixed_expert is not None or self.router is None:
            g_TE = x_TI.new_zeros(T, E)
            g_TE[:, self.fixed_expert or 0] = 1
            self.aux_losses = {}
            return g_TE
        decision = self.router(x_TI)
        coefs = self.router.loss_coefs()
        self.aux_losses = {n: coefs[n] * v for n, v in decision.aux_losses.items() if coefs.get(n, 0.0) > 0}
        g_TE = decision.dense().to(x_TI.dtype)
        self.last_weights_TE = g_TE.detach()
        return g_TE

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        E, R = self.num_experts, self.rank
        x_TI = x.reshape(-1, x.shape[-1])
        d_TI = self.drop(x_TI)
        g_TE = self.gates(x_TI)
        h_TER = (d_TI @ self.lora_A_ERI.reshape(E * R, -1).t()).view(-1, E, R) * g_TE[:, :, None]
        delta_TO = h_TER.reshape(-1, E * R) @ self.lora_B_EOR.permute(1, 0, 2).reshape(-1, E * R).t()
        if self.shared:
            delta_TO = delta_TO + (d_TI @ self.shared_A_RI.t()) @ self.shared_B_OR.t()
        return y + (self.scaling * delta_TO).view(*x.shape[:-1], -1)

    def forward_reference(self, x: Tensor) -> Tensor:
        """The same function, one expert at a time (readable reference; no dropout)."""
        x_TI = x.reshape(-1, x.shape[-1])
        g_TE = self.gates(x_TI)
        y_TO = self.base(x_TI)
        for e in range(self.num_experts):
            y_TO = y_TO + self.scaling * g_TE[:, e:e + 1] * (x_TI @ self.lora_A_ERI[e].t() @ self.lora_B_EOR[e].t())
        if self.shared:
            y_TO = y_TO + self.scaling * (x_TI @ self.shared_A_RI.t() @ self.shared_B_OR.t())
        return y_TO.view(*x.shape[:-1], -1)

    def delta_weight(self, expert: int | None = None) -> Tensor:
        """``scaling * (B_e A_e [+ B_s A_s])`` ``[O, I]``: what merging adds to the base weight."""
        if expert is None:
            if self.num_experts > 1 and self.fixed_expert is None:
                raise PeftMergeError(
                    f"{self.name}: merging {self.num_experts} routed LoRA experts is not exact (the mix depends on "
                    f"the input); merge plain LoRA (num_experts: 1) or pass expert=E to fix one expert (task routing)")
            expert = self.fixed_expert or 0
        if not 0 <= expert < self.num_experts:
            raise PeftMergeError(f"{self.name}: expert {expert} is not in [0, {self.num_experts})")
        d_OI = self.lora_B_EOR[expert] @ self.lora_A_ERI[expert]
        if self.shared:
            d_OI = d_OI + self.shared_B_OR @ self.shared_A_RI
        return self.scaling * d_OI

    @torch.no_grad()
    def merge_(self, expert: int | None = None) -> None:
        if self.merged:
            return
        d_OI = self.delta_weight(expert)
        self.fixed_expert = expert if expert is not None else self.fixed_expert
        self.base.weight += d_OI.to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge_(self) -> None:
        if not self.merged:
            return
        self.base.weight -= self.delta_weight(self.fixed_expert if self.num_experts > 1 else None)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"shared={self.shared}, merged={self.merged}")

    def adapter_config(self) -> dict[str, Any]:
        return {"kind": "linear", "num_experts": self.num_experts, "top_k": self.top_k}
