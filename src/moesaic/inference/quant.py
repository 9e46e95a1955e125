"""Weight-only compressed experts: ``quantize_experts_(model, QuantConfig(bits=8 | 4, group_size=64))``
(``QuantConfig(ternary=True)``: dictionary-coded ternary experts, :mod:`moesaic.inference.quant_ternary`).

A transform (docs/design.md: components are swapped): every MoE layer's stacked FFN experts become
:class:`QuantizedExperts`, which hold each expert's two 3-D tensors in one of three forms, per expert:

* ``8``: int8 codes plus one fp32 scale per group of ``group_size`` consecutive input columns (symmetric
  absmax: ``scale = max|w| / 127``, ``q = round(w / scale)``, so ``|w - q * scale| <= scale / 2``), that is
  ``1 + 4 / group_size`` bytes per weight instead of 4 (0.27x at 64);
* ``4``: int4 codes per group (asymmetric: ``scale = (max - min) / 15``, ``q = round((w - min) / scale)`` in
  ``[0, 15]``, ``|w - (q * scale + min)| <= scale / 2``), two codes packed per byte, plus an fp32 scale and
  minimum per group: ``0.5 + 8 / group_size`` bytes per weight (0.16x at 64);
* ``0``: pruned: no storage; the expert acts as zero weights (its rows add nothing to their tokens).

Group-wise weight-only quantization as in LLM.int8()-style and GPTQ deployments (Dettmers et al. 2022;
Frantar et al. 2023); MoE experts tolerate it well (MoQE, Kim et al. 2023), and QMoE (Frantar & Alistarh
2023) compresses them much further. ``QuantConfig(plan=True)`` chooses the form per expert from measured
routing counts (:mod:`moesaic.inference.quant_plan`: hot experts int8, cold int4, never-used pruned).

The forward dequantizes only the experts that have rows (at decode: k of E) into the weights' dtype and
runs the same backend as the fp32 experts on them, so its output equals, bit for bit, fp32 experts holding
the dequantized weights (tested); routing is untouched. A batch-1 decode step on the CPU instead
dequantizes inside the matmuls, a block of rows at a time (:mod:`moesaic.inference.quant_blockwise`), with
the same bits. Inference only (no parameters, no gradients to the codes).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor, nn

from moesaic.core.config import Section, require, rule, validate_tree
from moesaic.core.errors import ConfigError
from moesaic.core.types import DispatchPlan
from moesaic.inference import quant_blockwise
from moesaic.moe.experts.backends import BACKENDS, resolve_backend
from moesaic.moe.experts.backends.active import one_token_counts
from moesaic.moe.experts.base import Experts
from moesaic.moe.experts.kernels import StackedFFN, glu_or_act
from moesaic.moe.experts.stacked_ffn import FFNExperts
from moesaic.moe.layer import MoELayer


@dataclasses.dataclass
class QuantConfig(Section):
    """``bits``: 8 (int8) or 4 (int4) for every expert; ``group_size``: input columns sharing one scale (must
    divide D and F; even for int4; 0 = a whole row, ternary only). ``plan``: bits per expert from routing
    counts instead (hot int8, cold int4, unused pruned; ``hot_fraction`` of the used experts are hot), see
    :mod:`moesaic.inference.quant_plan`. ``ternary``: every expert ternary by the TWN rule with threshold
    ``ternary_threshold * mean|w|`` per group, dictionary-coded with ``code_bits``-bit codewords
    (:mod:`moesaic.inference.quant_ternary`); with ``gptq`` the values are chosen by GPTQ on calibration
    activations (:mod:`moesaic.inference.quant_gptq`)."""

    bits: int = 8
    group_size: int = rule(64, ge=0)
    plan: bool = False
    hot_fraction: float = rule(0.5, ge=0.0, le=1.0)
    ternary: bool = False
    ternary_threshold: float = rule(0.7, gt=0.0)
    code_bits: int = 16
    gptq: bool = False

    def validate(self, path: str) -> None:
        require(self.bits in (8, 4), f"{path}.bits", self.bits, "must be 8 (int8) or 4 (int4)")
        require(self.group_size > 0 or self.ternary, f"{path}.group_size", self.group_size,
                "must be >= 1 (0, a whole row per scale, is for ternary experts only)")
        require(not (self.ternary and self.plan), f"{path}.ternary", self.ternary, "cannot be combined with plan")
        require(not self.gptq or self.ternary, f"{path}.gptq", self.gptq, "is for ternary experts only")
        require(self.code_bits in (8, 16), f"{path}.code_bits", self.code_bits,
                "must be 8 or 16 (byte or 16-bit codewords)")
        require(not ((self.bits == 4 or self.plan) and self.group_size % 2), f"{path}.group_size", self.group_size,
                "must be even for int4 (two codes per byte)")


def quantize_groups(w_EOI: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """int8 codes ``[E, O, I]`` and fp32 scales ``[E, O, I / group_size]`` (symmetric absmax per group)."""
    E, Out, In = w_EOI.shape
    g = w_EOI.detach().float().reshape(E, Out, In // group_size, group_size)
    scale_EOG = g.abs().amax(-1) / 127.0
    safe = torch.where(scale_EOG > 0, scale_EOG, torch.ones_like(scale_EOG))
    q = torch.round(g / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(E, Out, In), scale_EOG


def dequantize_groups(q_EOI: Tensor, scale_EOG: Tensor, dtype: torch.dtype = torch.float32,
                      out: Tensor | None = None) -> Tensor:
    """``q * scale`` per group, ``[E, O, I]`` in ``dtype``, in one pass (the int8 codes are converted inside the
    multiplication, exactly); into ``out`` (contiguous ``[E, O, I]`` of ``dtype``) when given."""
    E, Out, In = q_EOI.shape
    G = scale_EOG.shape[-1]
    if out is None:
        out = torch.empty(E, Out, In, dtype=dtype, device=q_EOI.device)
    torch.mul(q_EOI.reshape(E, Out, G, In // G), scale_EOG[..., None].to(dtype), out=out.view(E, Out, G, In // G))
    return out


def quantize_groups_int4(w_EOI: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Packed int4 codes ``[E, O, I / 2]`` (uint8, two per byte) and fp32 scales and minima
    ``[E, O, I / group_size]`` (asymmetric per group, codes in [0, 15])."""
    E, Out, In = w_EOI.shape
    g = w_EOI.detach().float().reshape(E, Out, In // group_size, group_size)
    lo_EOG, hi_EOG = g.amin(-1), g.amax(-1)
    scale_EOG = (hi_EOG - lo_EOG) / 15.0
    safe = torch.where(scale_EOG > 0, scale_EOG, torch.ones_like(scale_EOG))
    q = torch.round((g - lo_EOG[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8).reshape(E, Out, In)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous(), scale_EOG, lo_EOG


def dequantize_groups_int4(p_EOP: Tensor, scale_EOG: Tensor, min_EOG: Tensor,
                           dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
    """``q * scale + min`` per group from packed codes, ``[E, O, 2P]`` in ``dtype`` (the codes converted inside
    the multiplication, exactly); into ``out`` (contiguous ``[E, O, 2P]`` of ``dtype``) when given."""
    E, Out, P = p_EOP.shape
    G = scale_EOG.shape[-1]
    q = torch.stack((p_EOP & 0xF, p_EOP >> 4), dim=-1).reshape(E, Out, G, 2 * P // G)
    if out is None:
        out = torch.empty(E, Out, 2 * P, dtype=dtype, device=p_EOP.device)
    w = out.view(E, Out, G, 2 * P // G)
    torch.mul(q, scale_EOG[..., None].to(dtype), out=w)
    w.add_(min_EOG[..., None].to(dtype))
    return out


_PROJ = {"w_up_EHD": "up", "w_down_EDF": "down"}


class QuantizedExperts(Experts):
    """Stacked FFN experts stored per expert as group-wise int8, int4 or nothing (module docstring).

    ``bits_E[e]`` is expert e's form; the int8 experts' codes are stacked in ``q8_*`` / ``s8_*`` buffers and the
    int4 experts' in ``p4_*`` / ``s4_*`` / ``m4_*``, ``slot_E[e]`` being e's row in its stack. A batch-1 decode
    step dequantizes inside the matmuls, block by block (:mod:`moesaic.inference.quant_blockwise`); other
    calls dequantize the experts with rows, then run the fp32 backend."""

    #: whether a decode token may take the blockwise path (subclasses that decode whole experts set False)
    blockwise = True

    def __init__(self, ex: FFNExperts, group_size: int, bits_E: list[int] | None = None):
        super().__init__(ex.cfg, ex.d_model, ex.d_ff, ex.num_experts)
        self.activation, self.gated, self.backend, self.group_size = ex.cfg.activation, ex.gated, ex.cfg.backend, \
            group_size
        self.dtype = ex.w_up_EHD.dtype
        self.bits_E = list(bits_E) if bits_E is not None else [8] * ex.num_experts
        self.slot_E = [sum(1 for b in self.bits_E[:e] if b == self.bits_E[e]) for e in range(ex.num_experts)]
        self.pruned_rows = 0
        self._scratch: Tensor | None = None  # the blockwise decode's dequantization buffer (not state)
        for name, proj in _PROJ.items():
            w = getattr(ex, name)
            for bits, parts in ((8, ("q8", "s8")), (4, ("p4", "s4", "m4"))):
                idx = [e for e, b in enumerate(self.bits_E) if b == bits]
                if not idx:
                    continue
                fn = quantize_groups if bits == 8 else quantize_groups_int4
                for part, t in zip(parts, fn(w[idx], group_size), strict=True):
                    self.register_buffer(f"{part}_{proj}", t)

    def stacked_names(self) -> list[str]:
        return ["w_up_EHD", "w_down_EDF"]

    @property
    def _device(self) -> torch.device:
        """Where the codes live (the buffers; this module has no parameters)."""
        return next(iter(self.buffers())).device

    def _shape(self, proj: str) -> tuple[int, int]:
        return (2 * self.d_ff if self.gated else self.d_ff, self.d_model) if proj == "up" else \
            (self.d_model, self.d_ff)

    def _weight(self, proj: str, e: int, out: Tensor | None = None) -> Tensor:
        """Expert e's dequantized ``[O, I]`` weight of ``proj`` (zeros if pruned), into ``out`` when given."""
        if out is None:
            out = torch.empty(*self._shape(proj), dtype=self.dtype, device=self._device)
        self._rows_into(proj, e, 0, out.shape[0], out)
        return out

    def _rows_into(self, proj: str, e: int, a: int, b: int, out: Tensor) -> None:
        """Rows ``a:b`` of expert e's dequantized weight of ``proj`` into ``out`` (every group lies within one
        row, so a block of rows dequantizes to the same values as the whole weight)."""
        bits, i = self.bits_E[e], self.slot_E[e]
        if bits == 8:
            dequantize_groups(self.get_buffer(f"q8_{proj}")[i:i + 1, a:b], self.get_buffer(f"s8_{proj}")[i:i + 1, a:b],
                              self.dtype, out[None])
        elif bits == 4:
            p4, s4, m4 = (self.get_buffer(f"{p}_{proj}")[i:i + 1, a:b] for p in ("p4", "s4", "m4"))
            dequantize_groups_int4(p4, s4, m4, self.dtype, out[None])
        else:
            out.zero_()

    def _one_token(self, x_1D: Tensor, plan: DispatchPlan, active: list[int]) -> Tensor | None:
        """A batch-1 decode step with dequantization inside the matmuls (:mod:`.quant_blockwise`): the same
        bits as the ``active`` backend's one-token path on the dequantized weights, or None where that path
        would not run or the probe found the blocks not bitwise."""
        if not self.blockwise or one_token_counts(x_1D, plan, self.dtype) is None:
            return None
        H, D = self._shape("up")
        rows = {n: quant_blockwise.block_rows(n, self.dtype) for n in (D, self.d_ff)}
        if not (quant_blockwise.bitwise(self.dtype, H, D, rows[D])
                and quant_blockwise.bitwise(self.dtype, D, self.d_ff, rows[self.d_ff])):
            return None
        size = max(rows[n] * n for n in rows)
        if self._scratch is None or self._scratch.numel() < size:
            self._scratch = torch.empty(size, dtype=self.dtype)
        buf = self._scratch
        y_1D = x_1D.new_zeros(1, D)
        for e, w in zip(active, plan.weight_N.tolist(), strict=True):  # token_experts' order and arithmetic
            h = quant_blockwise.blockwise_linear(x_1D, H, functools.partial(self._rows_into, "up", e), buf)
            act = glu_or_act(h, self.activation, self.gated)
            y_e = quant_blockwise.blockwise_linear(act, D, functools.partial(self._rows_into, "down", e), buf)
            y_1D.add_(y_e * w)
        return y_1D

    def _stack(self, proj: str, active: list[int]) -> Tensor:
        """``[A, O, I]``: the active experts' dequantized weights, each written once into its row."""
        w_AOI = torch.empty(len(active), *self._shape(proj), dtype=self.dtype, device=self._device)
        for j, e in enumerate(active):
            self._weight(proj, e, w_AOI[j])
        return w_AOI

    def expert_state(self, e: int) -> dict[str, Tensor]:
        """Expert e's dequantized tensors (zeros for a pruned expert)."""
        return {name: self._weight(proj, e) for name, proj in _PROJ.items()}

    def load_expert_state(self, e: int, state: dict[str, Tensor]) -> None:
        """Quantize and store one expert's tensors in its form (a pruned expert stays pruned)."""
        b, i = self.bits_E[e], self.slot_E[e]
        for name, proj in _PROJ.items():
            parts: tuple[str, ...]
            new: tuple[Tensor, ...]
            if b == 8:
                parts, new = ("q8", "s8"), quantize_groups(state[name][None], self.group_size)
            elif b == 4:
                parts, new = ("p4", "s4", "m4"), quantize_groups_int4(state[name][None], self.group_size)
            else:
                continue
            for part, t in zip(parts, new, strict=True):
                self.get_buffer(f"{part}_{proj}")[i].copy_(t[0])

    def nbytes(self) -> int:
        """Bytes of the codes, scales and minima."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x_TD: Tensor, plan: DispatchPlan, backend: str | None = None) -> Tensor:
        """Dequantize the experts with rows, then the fp32 backend on them (the same rows per expert)."""
        name = resolve_backend(backend or self.backend, plan.num_rows, self.num_experts)
        if plan.slots is not None:  # Soft MoE: every expert computes
            active = list(range(self.num_experts))
        else:
            active = plan.counts_E.nonzero().flatten().tolist()
            self.pruned_rows += sum(int(plan.counts_E[e]) for e in active if self.bits_E[e] == 0)
        if name == "active" and plan.slots is None:
            y_1D = self._one_token(x_TD, plan, active)
            if y_1D is not None:
                return y_1D
        w_up_AHD, w_down_ADF = self._stack("up", active), self._stack("down", active)
        sub = plan
        if plan.slots is None:
            sub = dataclasses.replace(plan, counts_E=plan.counts_E[torch.tensor(active, device=plan.counts_E.device,
                                                                                dtype=torch.long)])
        return BACKENDS.get(name).run(x_TD, sub, StackedFFN(w_up_AHD, w_down_ADF, self.activation, self.gated))

    def extra_repr(self) -> str:
        n = {b: self.bits_E.count(b) for b in (8, 4, 0)}
        return (f"num_experts={self.num_experts}, int8={n[8]}, int4={n[4]}, pruned={n[0]}, "
                f"group_size={self.group_size}")


def quantize_experts_(model: nn.Module, cfg: QuantConfig | None = None, usage: dict[str, Tensor] | None = None,
                      hessians: dict[str, dict[str, Tensor]] | None = None) -> dict[str, QuantizedExperts]:
    """Swap every MoE layer's stacked FFN experts for :class:`QuantizedExperts`; returns them by layer path.
    With ``cfg.plan``, ``usage`` gives the routing counts per layer path
    (:func:`moesaic.inference.quant_plan.expert_usage`); with ``cfg.gptq``, ``hessians`` the calibration
    second moments per layer path (:func:`moesaic.inference.quant_gptq.expert_hessians`). :class:`ConfigError`
    (nothing swapped) for a group size that does not divide D or F, experts that are not stacked FFN
    experts, or a plan without counts or GPTQ without Hessians."""
    from moesaic.inference.quant_plan import usage_plan
    from moesaic.inference.quant_ternary import TernaryExperts

    cfg = validate_tree(cfg or QuantConfig(), "quant")
    layers = [(n or "moe", m) for n, m in model.named_modules() if isinstance(m, MoELayer)]
    for name, layer in layers:
        ex = layer.experts
        if not isinstance(ex, FFNExperts) or type(ex).forward is not FFNExperts.forward:
            raise ConfigError(f"{name}.experts", type(ex).__name__, "only stacked FFN experts can be quantized")
        for w in (ex.w_up_EHD, ex.w_down_EDF):
            if cfg.group_size and w.shape[-1] % cfg.group_size:
                raise ConfigError("quant.group_size", cfg.group_size,
                                  f"must divide the input width {w.shape[-1]} of {name}")
        if cfg.plan and (usage is None or name not in usage):
            raise ConfigError("quant.plan", True, f"needs routing counts for {name} (expert_usage on calibration data)")
        if cfg.gptq and (hessians is None or name not in hessians):
            raise ConfigError("quant.gptq", True, f"needs calibration Hessians for {name} (expert_hessians)")
    out = {}
    for name, layer in layers:
        assert isinstance(layer.experts, FFNExperts)
        bits = usage_plan(usage[name], cfg.hot_fraction) if cfg.plan and usage is not None else \
            [cfg.bits] * layer.experts.num_experts
        values = _gptq_values(layer.experts, cfg, hessians[name]) if cfg.gptq and hessians is not None else None
        new = TernaryExperts(layer.experts, cfg.group_size, cfg.ternary_threshold, cfg.code_bits, values) \
            if cfg.ternary else QuantizedExperts(layer.experts, cfg.group_size, bits)
        layer.experts = new
        out[name] = new
    return out


def _gptq_values(ex: FFNExperts, cfg: QuantConfig, H: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Every expert's ternary values and scales by GPTQ (:func:`moesaic.inference.quant_gptq.gptq_ternary`)."""
    from moesaic.inference.quant_gptq import gptq_ternary

    out = {}
    for name, proj in _PROJ.items():
        w = getattr(ex, name)
        per = [gptq_ternary(w[e], H[proj][e], cfg.group_size, cfg.ternary_threshold) for e in range(ex.num_experts)]
        out[proj] = (torch.stack([t for t, _ in per]), torch.stack([s for _, s in per]))
    return out
