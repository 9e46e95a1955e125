"""LoRA on a stacked 3-D expert weight ``[E, O, I]`` (moesaic ``w_up_EHD``/``w_down_EDF``, transformers'
fused ``gate_up_proj``/``down_proj``): each MoE expert e gets its own pair, ``W_e + (alpha / r) B_e A_e``.

Applied with :func:`torch.nn.utils.parametrize.register_parametrization`, so whatever reads the weight (our
experts backends, transformers' expert kernels) sees the adapted weight and nothing in the layer changes; the
MoE's own router already picks the experts. ``B = 0`` at init, so the weight is the base weight exactly.
Input dropout does not apply (the adapter lives in weight space); merging is always exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


class StackedLoRA(nn.Module):
    """The parametrization: ``W_EOI -> W_EOI + scaling * B_EOR @ A_ERI``."""

    def __init__(self, weight: Tensor, rank: int, alpha: float, name: str = "") -> None:
        super().__init__()
        E, D_out, D_in = weight.shape
        self.name, self.rank, self.alpha, self.scaling = name, rank, alpha, alpha / rank
        self.num_experts, self.top_k = E, 1
        self.lora_A_ERI = nn.Parameter(torch.empty(E, rank, D_in, device=weight.device, dtype=weight.dtype))
        self.lora_B_EOR = nn.Parameter(torch.zeros(E, D_out, rank, device=weight.device, dtype=weight.dtype))
        for e in range(E):
            nn.init.kaiming_uniform_(self.lora_A_ERI[e], a=math.sqrt(5))
        self.merged = False

    def delta_weight(self) -> Tensor:
        return self.scaling * torch.bmm(self.lora_B_EOR, self.lora_A_ERI)

    def forward(self, w_EOI: Tensor) -> Tensor:
        return w_EOI if self.merged else w_EOI + self.delta_weight().to(w_EOI.dtype)


def add_stacked_lora_(module: nn.Module, param: str, rank: int, alpha: float, name: str) -> StackedLoRA:
    """Parametrize ``module.<param>`` (3-D) with a :class:`StackedLoRA`; the original stays frozen."""
    weight = getattr(module, param)
    lora = StackedLoRA(weight.detach(), rank, alpha, name)
    parametrize.register_parametrization(module, param, lora, unsafe=True)
    return lora


@torch.no_grad()
def merge_stacked_(module: nn.Module, param: str, lora: StackedLoRA) -> None:
    if not lora.merged:
        original = module.parametrizations[param].original  # type: ignore[union-attr,index]
        original += lora.delta_weight().to(original.dtype)
        lora.merged = True


@torch.no_grad()
def unmerge_stacked_(module: nn.Module, param: str, lora: StackedLoRA) -> None:
    if lora.merged:
        original = module.parametrizations[param].original  # type: ignore[union-attr,index]
        original -= lora.delta_weight().to(original.dtype)
        lora.merged = False
