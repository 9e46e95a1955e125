"""Weight-only int8 experts, group-wise: ``quantize_experts_(model, QuantConfig(bits=8, group_size=64))``.

A transform (docs/design.md: components are swapped): every MoE layer's stacked FFN experts become
:class:`Int8Experts`, which keep each 3-D expert tensor as int8 codes plus one fp32 scale per group of
``group_size`` consecutive input columns (symmetric absmax: ``scale = max|w| / 127``,
``q = round(w / scale)``, so ``|w - q * scale| <= scale / 2``). That is ``1 + 4 / group_size`` bytes per
weight instead of 4 (0.27x at 64). Group-wise weight-only quantization as in LLM.int8()-style and GPTQ
deployments (Dettmers et al. 2022; Frantar et al. 2023); QMoE (Frantar & Alistarh 2023) compresses MoE
experts the same way, much further.

The forward dequantizes only the experts that have rows (at decode: k of E) into fp32 and runs the same
backend as the fp32 experts on them, so its output equals, bit for bit, fp32 experts holding the
dequantized weights (tested); routing is untouched. Inference only (no parameters, no gradients to the
codes).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from moesaic.core.config import Section, require, rule, validate_tree
from moesaic.core.errors import ConfigError
from moesaic.core.types import DispatchPlan
from moesaic.moe.experts.backends import BACKENDS, resolve_backend
from moesaic.moe.experts.base import Experts
from moesaic.moe.experts.kernels import StackedFFN
from moesaic.moe.experts.stacked_ffn import FFNExperts
from moesaic.moe.layer import MoELayer


@dataclasses.dataclass
class QuantConfig(Section):
    """``bits``: 8 (int8 codes); ``group_size``: input columns sharing one scale (must divide D and F)."""

    bits: int = 8
    group_size: int = rule(64, ge=1)

    def validate(self, path: str) -> None:
        require(self.bits == 8, f"{path}.bits", self.bits, "only 8 (int8) is implemented")


def quantize_groups(w_EOI: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """int8 codes ``[E, O, I]`` and fp32 scales ``[E, O, I / group_size]`` (symmetric absmax per group)."""
    E, Out, In = w_EOI.shape
    g = w_EOI.detach().float().reshape(E, Out, In // group_size, group_size)
    scale_EOG = g.abs().amax(-1) / 127.0
    safe = torch.where(scale_EOG > 0, scale_EOG, torch.ones_like(scale_EOG))
    q = torch.round(g / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(E, Out, In), scale_EOG


def dequantize_groups(q_EOI: Tensor, scale_EOG: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q * scale`` per group, ``[E, O, I]`` in ``dtype``."""
    E, Out, In = q_EOI.shape
    G = scale_EOG.shape[-1]
    w = q_EOI.reshape(E, Out, G, In // G).to(dtype) * scale_EOG[..., None].to(dtype)
    return w.reshape(E, Out, In)


class Int8Experts(Experts):
    """Stacked FFN experts stored as group-wise int8 codes + fp32 scales (module docstring)."""

    q_up_EHD: Tensor
    s_up_EHG: Tensor
    q_down_EDF: Tensor
    s_down_EDG: Tensor

    def __init__(self, ex: FFNExperts, group_size: int):
        super().__init__(ex.cfg, ex.d_model, ex.d_ff, ex.num_experts)
        self.activation, self.gated, self.backend, self.group_size = ex.cfg.activation, ex.gated, ex.cfg.backend, \
            group_size
        self.dtype = ex.w_up_EHD.dtype
        q_up, s_up = quantize_groups(ex.w_up_EHD, group_size)
        q_down, s_down = quantize_groups(ex.w_down_EDF, group_size)
        self.register_buffer("q_up_EHD", q_up)
        self.register_buffer("s_up_EHG", s_up)
        self.register_buffer("q_down_EDF", q_down)
        self.register_buffer("s_down_EDG", s_down)

    def stacked_names(self) -> list[str]:
        return ["w_up_EHD", "w_down_EDF"]

    def expert_state(self, e: int) -> dict[str, Tensor]:
        """Expert e's dequantized tensors."""
        return {"w_up_EHD": dequantize_groups(self.q_up_EHD[e:e + 1], self.s_up_EHG[e:e + 1], self.dtype)[0],
                "w_down_EDF": dequantize_groups(self.q_down_EDF[e:e + 1], self.s_down_EDG[e:e + 1], self.dtype)[0]}

    def load_expert_state(self, e: int, state: dict[str, Tensor]) -> None:
        """Quantize and store one expert's tensors."""
        for n, (q, s) in {"w_up_EHD": ("q_up_EHD", "s_up_EHG"), "w_down_EDF": ("q_down_EDF", "s_down_EDG")}.items():
            qe, se = quantize_groups(state[n][None], self.group_size)
            getattr(self, q)[e].copy_(qe[0])
            getattr(self, s)[e].copy_(se[0])

    def nbytes(self) -> int:
        """Bytes of the codes and scales."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x_TD: Tensor, plan: DispatchPlan, backend: str | None = None) -> Tensor:
        """Dequantize the experts with rows, then the fp32 backend on them (the same rows per expert)."""
        name = resolve_backend(backend or self.backend, plan.num_rows, self.num_experts)
        if plan.slots is not None:  # Soft MoE: every expert computes
            idx = torch.arange(self.num_experts, device=x_TD.device)
        else:
            idx = plan.counts_E.nonzero().flatten()
        w_up_AHD = dequantize_groups(self.q_up_EHD[idx], self.s_up_EHG[idx], self.dtype)
        w_down_ADF = dequantize_groups(self.q_down_EDF[idx], self.s_down_EDG[idx], self.dtype)
        sub = dataclasses.replace(plan, counts_E=plan.counts_E[idx]) if plan.slots is None else plan
        return BACKENDS.get(name).run(x_TD, sub, StackedFFN(w_up_AHD, w_down_ADF, self.activation, self.gated))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, int8, group_size={self.group_size}"


def quantize_experts_(model: nn.Module, cfg: QuantConfig | None = None) -> dict[str, Int8Experts]:
    """Swap every MoE layer's stacked FFN experts for :class:`Int8Experts`; returns them by layer path.
    :class:`ConfigError` (nothing swapped) for a group size that does not divide D or F, or experts that
    are not stacked FFN experts."""
    cfg = validate_tree(cfg or QuantConfig(), "quant")
    layers = [(n or "moe", m) for n, m in model.named_modules() if isinstance(m, MoELayer)]
    for name, layer in layers:
        ex = layer.experts
        if not isinstance(ex, FFNExperts) or type(ex).forward is not FFNExperts.forward:
            raise ConfigError(f"{name}.experts", type(ex).__name__, "only stacked FFN experts can be quantized")
        for w in (ex.w_up_EHD, ex.w_down_EDF):
            if w.shape[-1] % cfg.group_size:
                raise ConfigError("quant.group_size", cfg.group_size,
                                  f"must divide the input width {w.shape[-1]} of {name}")
    out = {}
    for name, layer in layers:
        assert isinstance(layer.experts, FFNExperts)
        new = Int8Experts(layer.experts, cfg.group_size)
        layer.experts = new
        out[name] = new
    return out
