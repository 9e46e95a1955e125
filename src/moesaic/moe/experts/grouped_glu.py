"""Fused gather -> grouped FFN -> weighted scatter as one autograd function (the ``fused`` backend).

ScatterMoE (Tan et al. 2024) fuses the dispatch gather and the combine scatter into its grouped GEMMs so
no padded or permuted copy is kept for backward. This is the same idea with stock PyTorch ops:

* forward: ``x_ND = x_SD[rows_N]`` (gathered into a temporary), ``h_NH = up_e(x_ND)`` per expert,
  ``a_NF = act(gate) * up`` scaled by the routing weight ``w_N`` *before* the down projection
  (``w (a W^T) = (w a) W^T``), ``y_ND = down_e(a_NF)`` and ``y_TD = index_add(rows_N, y_ND)``;
* blocks: on CPU the experts are taken in consecutive blocks of up to :data:`BLOCK_BYTES` of row
  temporaries, and each block runs the whole chain on its own rows (an expert with more rows is a block
  of its own, so the temporaries of large inputs stay O(rows of one expert)); smaller inputs are one
  block; on CUDA all rows are one block and the grouped_mm offsets never leave the device (no sync);
* saved for backward: small inputs (under :data:`KEEP_GATHERED_MAX_BYTES` of kept activations) keep the
  gathered rows, ``h``, ``silu(gate)`` and the activation with and without the routing weight, so
  backward neither gathers nor recomputes; larger ones keep only ``h_NH`` (``[N, H]``) and gather and
  recompute the rest, so the ``[N, D]`` gathered input, the ``[N, F]`` activation and the ``[N, D]``
  expert output that plain autograd keeps are not held between forward and backward;
* each block's matmuls run as one ``grouped_mm`` per projection where the probe passes (no Python loop
  over experts), else as a loop of per-expert ``mm`` into a preallocated buffer (no ``torch.cat``).

Gradients: routing weights get ``dL/dw_n = <dL/da_n^w, a_n>``; the input gets the scatter-add of the
per-row input gradients; the weights get ``dW_e = dY_e^T A_e`` over each expert's contiguous slice.

Gated (SwiGLU, GeGLU) and plain MLP experts share this function: the gather, blocking, grouped matmuls,
weight gradients and scatter are the same, only the elementwise activation and its derivative differ
(:func:`_act_fwd`, :func:`_act_bwd`), so a separate MLP kernel would repeat 200 lines for one branch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from moesaic.moe.experts.kernels import (
    StackedFFN,
    compute_dtype,
    glu_or_act,
    grouped_mm,
    grouped_mm_aligned,
    grouped_mm_usable,
)

#: A block's matmul plan: per-expert row counts (host ints; None on the one-block device path) and the
#: grouped_mm offsets (None: a loop of per-expert ``mm``).
BlockPlan = tuple[list[int] | None, Tensor | None]


@dataclasses.dataclass(frozen=True)
class GLUCall:
    """The non-differentiable inputs of one :class:`GroupedGLU` call.

    ``rows_N`` (optional): gather ``x[rows_N]`` first and scatter-add the weighted outputs into ``num_out``
    rows at ``rows_N`` (the token rows of a dispatch plan); without it the input rows are already grouped
    by expert and the output has one row per input row. ``use_grouped``: run the matmuls as grouped_mm.
    """

    counts_E: Tensor
    activation: str
    gated: bool
    use_grouped: bool
    rows_N: Tensor | None = None
    num_out: int | None = None


def _mm_rows(a_NI: Tensor, w_EOI: Tensor, plan: BlockPlan, transpose: bool) -> Tensor:
    """Per expert e: ``a[rows_e] @ w[e]^T`` (transpose=True, [N, O]) or ``a[rows_e] @ w[e]`` ([N, I])."""
    counts, offs = plan
    if offs is not None:
        return grouped_mm(a_NI, w_EOI.transpose(1, 2) if transpose else w_EOI, offs)
    assert counts is not None
    out_dim = w_EOI.shape[1] if transpose else w_EOI.shape[2]
    out = a_NI.new_empty(a_NI.shape[0], out_dim)
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a_NI[start:start + n], w_EOI[e].t() if transpose else w_EOI[e], out=out[start:start + n])
        start += n
    return out


def _mm_weight_grad(g_NO: Tensor, a_NI: Tensor, plan: BlockPlan, num_experts: int,
                    out: Tensor | None = None) -> Tensor:
    """Per expert e: ``g[rows_e]^T @ a[rows_e]`` -> ``[E, O, I]`` (zero for experts without rows).

    ``out`` (host counts only): write into this ``[E, O, I]`` slice of the full gradient instead of a new
    tensor, so a blocked backward neither zero-fills nor copies the whole weight gradient."""
    counts, offs = plan
    if offs is not None and out is None:
        return grouped_mm(g_NO.t(), a_NI, offs)
    assert counts is not None
    if out is None:
        alloc = torch.zeros if 0 in counts else torch.empty
        out = alloc(num_experts, g_NO.shape[1], a_NI.shape[1], dtype=g_NO.dtype, device=g_NO.device)
    elif 0 in counts:
        out[torch.tensor([n == 0 for n in counts], device=out.device)] = 0
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(g_NO[start:start + n].t(), a_NI[start:start + n], out=out[e])
        start += n
    return out


def _swiglu(h_NH: Tensor, silu_NF: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(silu(gate), silu(gate) * up)`` of ``h_NH = [gate | up]``; ``silu_NF`` when already computed."""
    Fd = h_NH.shape[1] // 2
    if silu_NF is None:
        silu_NF = F.silu(h_NH[:, :Fd])
    return silu_NF, silu_NF * h_NH[:, Fd:]


def _act_fwd(h_NH: Tensor, activation: str, gated: bool) -> Tensor:
    if gated and activation == "silu":
        gate, up = h_NH.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
    return glu_or_act(h_NH, activation, gated)


def _act_bwd(h_NH: Tensor, g_a: Tensor, activation: str, gated: bool, silu_NF: Tensor | None = None) -> Tensor:
    """``dL/dh`` from ``h`` and ``dL/da`` (SwiGLU by hand with the fused ``silu_backward`` kernel, other
    activations through autograd); overwrites ``g_a``. ``silu_NF`` = silu(gate) when already computed."""
    if gated and activation == "silu":
        gate, up = h_NH.chunk(2, dim=-1)
        Fd = gate.shape[1]
        g_h = torch.empty_like(h_NH)
        torch.mul(g_a, silu_NF if silu_NF is not None else F.silu(gate), out=g_h[:, Fd:])
        torch.ops.aten.silu_backward.grad_input(g_a.mul_(up), gate, grad_input=g_h[:, :Fd])
        return g_h
    with torch.enable_grad():
        h = h_NH.detach().requires_grad_()
        a = glu_or_act(h, activation, gated)
        (g_h,) = torch.autograd.grad(a, h, g_a)
    return g_h


class GroupedGLU(torch.autograd.Function):
    """``y = scatter_rows(w_N * down_e(act(up_e(x[rows_N]))))``; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, x_SD: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                weight_N: Tensor | None, call: GLUCall) -> Tensor:
        rows_N, num_out, activation, gated = call.rows_N, call.num_out, call.activation, call.gated
        N = rows_N.shape[0] if rows_N is not None else x_SD.shape[0]
        blocks = _blocks(call.counts_E, N, call.use_grouped, x_SD, w_up_EHD)
        keep = _keep_for_backward(N, x_SD, w_up_EHD, w_down_EDF)
        swiglu = gated and activation == "silu"
        scatter = num_out is not None
        dev = x_SD.device.type
        saved: list[Tensor | None] = []
        with _no_autocast(dev):
            D = w_down_EDF.shape[1]
            y: Tensor  # the scatter target, a buffer for the blocks' rows, or the rows of the one block
            if scatter:
                assert num_out is not None
                y = x_SD.new_zeros(num_out, D)
            elif len(blocks) != 1 or blocks[0].rows != N:
                y = x_SD.new_zeros(N, D)
            for b in blocks:
                rows_b = rows_N[b.r0:b.r1] if rows_N is not None else None
                x_b = gather_rows(x_SD, rows_b) if rows_b is not None else x_SD[b.r0:b.r1]
                h_b = _mm_rows(x_b, w_up_EHD[b.e0:b.e1], b.plan, transpose=True)
                # silu(gate) is kept for backward only with the rest; otherwise act in place, one temporary
                silu_b, a_b = _swiglu(h_b) if swiglu and keep else (None, _act_fwd(h_b, activation, gated))
                aw_b = a_b
                if weight_N is not None:
                    w_b = weight_N[b.r0:b.r1].to(a_b.dtype).unsqueeze(1)
                    aw_b = a_b * w_b if keep else a_b.mul_(w_b)  # kept: backward needs both
                y_b = _mm_rows(aw_b, w_down_EDF[b.e0:b.e1], b.plan, transpose=True)
                if scatter:
                    assert rows_b is not None
                    y.index_add_(0, rows_b, y_b)
                elif len(blocks) == 1 and b.rows == N:
                    y = y_b
                else:
                    y[b.r0:b.r1] = y_b
                if keep:
                    saved += [x_b if rows_b is not None else None, h_b, silu_b, a_b, aw_b]
                else:
                    saved += [h_b]
                del x_b, a_b, aw_b, silu_b, y_b
        ctx.save_for_backward(x_SD, w_up_EHD, w_down_EDF, weight_N, rows_N, *saved)
        ctx.blocks, ctx.keep, ctx.act, ctx.gated, ctx.scatter = blocks, keep, activation, gated, scatter
        return y

    @staticmethod
    def backward(ctx: Any, g_out: Tensor) -> tuple[Tensor | None, ...]:
        x_SD, w_up, w_down, weight_N, rows_N, *saved = ctx.saved_tensors
        blocks, need = ctx.blocks, ctx.needs_input_grad
        swiglu = ctx.gated and ctx.act == "silu"
        per = 5 if ctx.keep else 1
        dev = x_SD.device.type
        g_x = g_wup = g_wdown = g_weight = None
        with _no_autocast(dev):
            dt = w_up.dtype
            g_out = g_out.to(dt).contiguous()
            if need[0]:
                g_x = torch.zeros_like(x_SD)
            if need[3] and weight_N is not None:
                g_weight = torch.zeros_like(weight_N)
            g_wup = _WeightGrad(w_up, blocks) if need[1] else None
            g_wdown = _WeightGrad(w_down, blocks) if need[2] else None
            for i, b in enumerate(blocks):
                rows_b = rows_N[b.r0:b.r1] if rows_N is not None else None
                if ctx.keep:
                    x_b, h_b, silu_b, a_b, aw_b = saved[i * per:(i + 1) * per]
                else:
                    (h_b,), x_b, aw_b = saved[i * per:(i + 1) * per], None, None
                    silu_b, a_b = _swiglu(h_b) if swiglu else (None, _act_fwd(h_b, ctx.act, ctx.gated))
                g_b = gather_rows(g_out, rows_b) if rows_b is not None and ctx.scatter else g_out[b.r0:b.r1]
                g_a = _mm_rows(g_b, w_down[b.e0:b.e1], b.plan, transpose=False)
                if weight_N is None:
                    aw_b = a_b
                else:
                    if g_weight is not None:
                        g_weight[b.r0:b.r1] = torch.linalg.vecdot(g_a, a_b).to(weight_N.dtype)
                    w_b = weight_N[b.r0:b.r1].to(dt).unsqueeze(1)
                    g_a.mul_(w_b)
                    if aw_b is None:
                        # dW_down = g^T (w a) = (w g)^T a: scale the narrower of the recomputed a [n, F] and
                        # g [n, D] (g is the caller's gradient, not a fresh gather, without a scatter)
                        if a_b.shape[1] <= g_b.shape[1]:
                            aw_b = a_b.mul_(w_b)
                        else:
                            aw_b, g_b = a_b, (g_b.mul_(w_b) if ctx.scatter else g_b * w_b)
                if g_wdown is not None:
                    g_wdown.compute(b, g_b, aw_b)
                del a_b, aw_b, g_b
                g_h = _act_bwd(h_b, g_a, ctx.act, ctx.gated, silu_b)
                del g_a, silu_b
                if g_wup is not None:
                    if x_b is None:
                        x_b = gather_rows(x_SD, rows_b) if rows_b is not None else x_SD[b.r0:b.r1]
                    g_wup.compute(b, g_h, x_b)
                del x_b
                if g_x is not None:
                    g_xb = _mm_rows(g_h, w_up[b.e0:b.e1], b.plan, transpose=False)
                    if rows_b is not None:
                        g_x.index_add_(0, rows_b, g_xb)
                    else:
                        g_x[b.r0:b.r1] = g_xb
        return (g_x, g_wup.value() if g_wup is not None else None, g_wdown.value() if g_wdown is not None else None,
                g_weight, None)


class _Block:
    """Experts ``[e0, e1)`` and their rows ``[r0, r1)``; ``plan`` = (row counts, grouped_mm offsets)."""

    __slots__ = ("e0", "e1", "r0", "r1", "plan")

    def __init__(self, e0: int, e1: int, r0: int, r1: int, plan: BlockPlan):
        self.e0, self.e1, self.r0, self.r1, self.plan = e0, e1, r0, r1, plan

    @property
    def rows(self) -> int:
        return self.r1 - self.r0


class _WeightGrad:
    """The ``[E, O, I]`` gradient of a stacked expert weight, assembled block by block: each block writes its
    experts' slice in place (:meth:`compute`); experts that no block covers (no rows) are zeroed once."""

    def __init__(self, w: Tensor, blocks: list[_Block]):
        self.w, self.full = w, len(blocks) == 1 and blocks[0].e0 == 0 and blocks[0].e1 == w.shape[0]
        self.out: Tensor | None = None
        if not self.full:
            self.out = torch.empty_like(w)
            covered = torch.zeros(w.shape[0], dtype=torch.bool)
            for b in blocks:
                covered[b.e0:b.e1] = True
            if not bool(covered.all()):
                self.out[(~covered).to(w.device)] = 0

    def compute(self, b: _Block, g_NO: Tensor, a_NI: Tensor) -> None:
        """``dW[e] = g[rows_e]^T a[rows_e]`` for the experts of block ``b``."""
        if self.full:
            self.out = _mm_weight_grad(g_NO, a_NI, b.plan, b.e1 - b.e0)
        else:
            assert self.out is not None
            _mm_weight_grad(g_NO, a_NI, b.plan, b.e1 - b.e0, out=self.out[b.e0:b.e1])

    def value(self) -> Tensor:
        return self.out if self.out is not None else torch.zeros_like(self.w)


def _blocks(counts_E: Tensor, N: int, use_grouped: bool, x_SD: Tensor, w_up_EHD: Tensor) -> list[_Block]:
    """Consecutive expert ranges holding about :data:`BLOCK_BYTES` of ``[rows, max(D, H)]`` temporaries each
    (CPU; an expert with more rows is a block of its own); one block on other devices, where grouped_mm
    offsets stay on the device (no host sync). Blocks without rows are left out."""
    E = counts_E.shape[0]
    if use_grouped and x_SD.device.type != "cpu":
        return [_Block(0, E, 0, N, (None, torch.cumsum(counts_E, 0).to(torch.int32)))]
    counts = counts_E.tolist()
    width = max(x_SD.shape[1], w_up_EHD.shape[1]) * x_SD.element_size()
    target = max(1, BLOCK_BYTES // width) if x_SD.device.type == "cpu" else sum(counts) or 1
    blocks: list[_Block] = []
    e0, r0, n = 0, 0, 0
    for e, c in enumerate(counts):
        n += c
        if n >= target or e == E - 1:
            if n:
                cs = counts[e0:e + 1]
                offs = (torch.tensor(cs, device=counts_E.device).cumsum(0).to(torch.int32) if use_grouped
                        else None)
                blocks.append(_Block(e0, e + 1, r0, r0 + n, (cs, offs)))
            e0, r0, n = e + 1, r0 + n, 0
    return blocks


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """The kernel runs in the dtype it was given (the caller casts once), never in autocast's."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


#: CPU block size: experts are taken in consecutive blocks whose ``[rows, max(D, H)]`` temporaries hold about
#: this many bytes, and each block runs gather -> matmuls -> activation -> scatter on its own rows; an
#: expert with more rows is a block of its own, so the temporaries of large inputs stay O(rows of one
#: expert). Below it all rows are one block: fewer, larger elementwise ops. (Smaller blocks, sized for the
#: L2 cache, were measured too: 1 MiB blocks made the demo layer's fused fwd + bwd 6% slower than one
#: block, 1 thread. At 64 MiB, T=2048, E=64, k=8 ran as two blocks and fwd + bwd was 5-8 % slower than one
#: block, at 1 and 2 threads, wall clock, interleaved: docs/benchmarks.md, issue 13.)
BLOCK_BYTES = 256 << 20


#: Below this many bytes of activations to keep (``[N, D + H + 3F]``: the gathered rows, ``h``, ``silu(gate)``
#: and the activation with and without the routing weight), the forward keeps them for backward instead of
#: gathering and recomputing them (small inputs, where every pass counts); above it only ``h_NH`` is kept.
#: 512 MiB keeps T=2048, E=64, k=8 (369 MB; autograd's grouped_mm path keeps more) and leaves T=8192 on the
#: lean path (1.5 GB would be kept), where the memory target of docs/benchmarks.md applies.
KEEP_GATHERED_MAX_BYTES = 512 << 20


def _keep_for_backward(N: int, x_SD: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor) -> bool:
    width = x_SD.shape[1] + w_up_EHD.shape[1] + 3 * w_down_EDF.shape[2]
    return N * width * x_SD.element_size() <= KEEP_GATHERED_MAX_BYTES


def gather_rows(x_SD: Tensor, rows_N: Tensor) -> Tensor:
    """``x_SD[rows_N]`` as one ``embedding`` lookup (a plain row gather; ``aten::index`` is slower on CPU)."""
    return F.embedding(rows_N, x_SD)


def grouped_glu(x_SD: Tensor, ffn: StackedFFN, counts_E: Tensor, rows_N: Tensor | None = None,
                weight_N: Tensor | None = None, num_out: int | None = None) -> Tensor:
    """Run :class:`GroupedGLU` in the compute dtype (autocast's, if on); grouped_mm where usable (one call per
    projection and block instead of a Python loop over the experts).

    Without ``rows_N`` the rows of ``x_SD`` are grouped by expert (``counts_E``) and the output has one row
    per input row; with it, rows ``x_SD[rows_N]`` are computed and scatter-added (times ``weight_N``) into
    ``num_out`` output rows at ``rows_N``.
    """
    dt = compute_dtype(x_SD, ffn.w_up_EHD)
    n_rows = rows_N.shape[0] if rows_N is not None else x_SD.shape[0]  # grouped_mm rejects 0 rows
    use_grouped = (n_rows > 0 and grouped_mm_usable(x_SD.device, dt)
                   and grouped_mm_aligned(x_SD, ffn.w_up_EHD, ffn.w_down_EDF, dtype=dt))
    call = GLUCall(counts_E, ffn.activation, ffn.gated, use_grouped, rows_N, num_out)
    w_up, w_down = ffn.w_up_EHD.to(dt), ffn.w_down_EDF.to(dt)
    y: Tensor = GroupedGLU.apply(x_SD.to(dt), w_up, w_down, weight_N, call)  # type: ignore[no-untyped-call]
    return y
