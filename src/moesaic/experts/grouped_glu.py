"""Fused gather -> grouped FFN -> weighted scatter as one autograd function (systems.md §2.2-§2.3).

ScatterMoE (Tan et al. 2024) fuses the dispatch gather and the combine scatter into its grouped GEMMs so
no padded or permuted copy is kept for backward. This is the same idea with stock PyTorch ops:

* forward: ``x_ND = x_SD[rows_N]`` (gathered into a temporary), ``h_NH = up_e(x_ND)`` per expert,
  ``a_NF = act(gate) * up`` scaled by the routing weight ``w_N`` *before* the down projection
  (``w (a W^T) = (w a) W^T``), ``y_ND = down_e(a_NF)`` and ``y_TD = index_add(rows_N, y_ND)``;
* saved for backward: ``h_NH`` (``[N, H]``) and the inputs; ``x_ND`` is gathered again and the
  activation recomputed, so the ``[N, D]`` gathered input, the ``[N, F]`` activation and the ``[N, D]``
  expert output that plain autograd keeps are not held between forward and backward (small inputs,
  under :data:`KEEP_GATHERED_MAX_BYTES`, keep ``x_ND`` and the gate activation instead: a gather and a
  recompute cost more there than the memory);
* every per-expert matmul writes into a preallocated buffer (no ``torch.cat``), either by a loop over the
  non-empty experts (``mm="loop"``; one host sync for the counts) or by ``grouped_mm`` (``mm="grouped"``;
  no sync), used where the probe passes: always on CUDA, and on CPU while the ``[N, *]`` temporaries
  stay under :data:`BATCH_ROWS_MAX_BYTES`;
* on CPU, inputs whose temporaries stay under that bound run the gather, activation and scaling on all
  rows at once (fewer, larger elementwise ops); larger ones go one expert at a time, so temporaries stay
  O(rows of one expert).

Gradients: routing weights get ``dL/dw_n = <dL/da_n^w, a_n>``; the input gets the scatter-add of the
per-row input gradients; the weights get ``dW_e = dY_e^T A_e`` over each expert's contiguous slice.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from moesaic.experts import backends as B


def _mm_rows(a_NI: Tensor, w_EOI: Tensor, plan, transpose: bool) -> Tensor:
    """Per expert e: ``a[rows_e] @ w[e]^T`` (transpose=True, [N, O]) or ``a[rows_e] @ w[e]`` ([N, I])."""
    counts, offs = plan
    if offs is not None:
        return B._GMM_FN(a_NI, w_EOI.transpose(1, 2) if transpose else w_EOI, offs=offs)
    out_dim = w_EOI.shape[1] if transpose else w_EOI.shape[2]
    out = a_NI.new_empty(a_NI.shape[0], out_dim)
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a_NI[start:start + n], w_EOI[e].t() if transpose else w_EOI[e], out=out[start:start + n])
        start += n
    return out


def _mm_weight_grad(g_NO: Tensor, a_NI: Tensor, plan, num_experts: int) -> Tensor:
    """Per expert e: ``g[rows_e]^T @ a[rows_e]`` -> ``[E, O, I]`` (zero for experts without rows)."""
    counts, offs = plan
    if offs is not None:
        return B._GMM_FN(g_NO.t(), a_NI, offs=offs)
    alloc = torch.zeros if 0 in counts else torch.empty
    out = alloc(num_experts, g_NO.shape[1], a_NI.shape[1], dtype=g_NO.dtype, device=g_NO.device)
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
    return B.glu_or_act(h_NH, activation, gated)


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
        a = B.glu_or_act(h, activation, gated)
        (g_h,) = torch.autograd.grad(a, h, g_a)
    return g_h


class GroupedGLU(torch.autograd.Function):
    """``y = scatter_rows(w_N * down_e(act(up_e(x[rows_N]))))``; see the module docstring."""

    @staticmethod
    def forward(ctx, x_SD: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor, weight_N: Tensor | None,  # type: ignore[override]
                rows_N: Tensor | None, counts_E: Tensor, num_out: int | None, activation: str, gated: bool,
                use_grouped: bool) -> Tensor:
        plan = _plan(counts_E, use_grouped)
        dev = x_SD.device.type
        with torch.autocast(dev, enabled=False) if dev in ("cpu", "cuda") else _null():
            if plan[1] is None and not _batch_rows(rows_N, x_SD, w_up_EHD):
                # a loop plan on many rows: one expert at a time, temporaries O(rows of one expert)
                h_NH, y = _forward_by_expert(x_SD, w_up_EHD, w_down_EDF, weight_N, rows_N, plan[0], num_out,
                                             activation, gated)
                ctx.save_for_backward(x_SD, w_up_EHD, w_down_EDF, weight_N, rows_N, h_NH, None, None)
                ctx.plan, ctx.act, ctx.gated, ctx.scatter = plan, activation, gated, num_out is not None
                ctx.by_expert = True
                return y
            x_ND = gather_rows(x_SD, rows_N) if rows_N is not None else x_SD
            h_NH = _mm_rows(x_ND, w_up_EHD, plan, transpose=True)
            keep = rows_N is not None and _keep_for_backward(x_ND)
            if keep and gated and activation == "silu":
                silu_NF, a_NF = _swiglu(h_NH)
            else:
                silu_NF, a_NF = None, _act_fwd(h_NH, activation, gated)
            x_keep = x_ND if keep else None
            del x_ND
            if weight_N is not None:
                a_NF.mul_(weight_N.to(a_NF.dtype).unsqueeze(1))
            y_ND = _mm_rows(a_NF, w_down_EDF, plan, transpose=True)
            del a_NF
            if num_out is not None:
                y = y_ND.new_zeros(num_out, y_ND.shape[1]).index_add_(0, rows_N, y_ND)
            else:
                y = y_ND
        ctx.save_for_backward(x_SD, w_up_EHD, w_down_EDF, weight_N, rows_N, h_NH, x_keep, silu_NF)
        ctx.plan, ctx.act, ctx.gated, ctx.scatter = plan, activation, gated, num_out is not None
        ctx.by_expert = False
        return y

    @staticmethod
    def backward(ctx, g_out: Tensor):  # type: ignore[override]
        x_SD, w_up, w_down, weight_N, rows_N, h_NH, x_kept, silu_NF = ctx.saved_tensors
        plan, E, need = ctx.plan, w_up.shape[0], ctx.needs_input_grad
        dev = h_NH.device.type
        g_x = g_wup = g_wdown = g_weight = None
        with torch.autocast(dev, enabled=False) if dev in ("cpu", "cuda") else _null():
            g_out = g_out.to(h_NH.dtype)
            if ctx.by_expert:
                return (*_backward_by_expert(ctx, g_out, x_SD, w_up, w_down, weight_N, rows_N, h_NH),
                        None, None, None, None, None, None)
            g_ND = gather_rows(g_out, rows_N) if ctx.scatter else g_out.contiguous()
            swiglu = ctx.gated and ctx.act == "silu"
            silu_NF, a_NF = _swiglu(h_NH, silu_NF) if swiglu else (None, _act_fwd(h_NH, ctx.act, ctx.gated))
            g_a = _mm_rows(g_ND, w_down, plan, transpose=False)
            if weight_N is not None:
                if need[3]:
                    g_weight = torch.linalg.vecdot(g_a, a_NF).to(weight_N.dtype)
                w_col = weight_N.to(h_NH.dtype).unsqueeze(1)
                g_a.mul_(w_col)
                # dW_down = g^T (w a) = (w g)^T a: scale the narrower of a [N, F] and g [N, D] (both fresh
                # here, except g when it is the caller's gradient: no scatter)
                if a_NF.shape[1] <= g_ND.shape[1]:
                    a_NF.mul_(w_col)
                else:
                    g_ND = g_ND.mul_(w_col) if ctx.scatter else g_ND * w_col
            if need[2]:
                g_wdown = _mm_weight_grad(g_ND, a_NF, plan, E)
            del a_NF, g_ND
            g_h = _act_bwd(h_NH, g_a, ctx.act, ctx.gated, silu_NF)
            del silu_NF
            del g_a
            if need[1]:
                x_ND = x_kept
                if x_ND is None:
                    x_ND = gather_rows(x_SD, rows_N) if rows_N is not None else x_SD
                g_wup = _mm_weight_grad(g_h, x_ND, plan, E)
                del x_ND
            if need[0]:
                g_xN = _mm_rows(g_h, w_up, plan, transpose=False)
                g_x = torch.zeros_like(x_SD).index_add_(0, rows_N, g_xN) if rows_N is not None else g_xN
        return g_x, g_wup, g_wdown, g_weight, None, None, None, None, None, None


def _forward_by_expert(x_SD, w_up, w_down, weight_N, rows_N, counts, num_out, act, gated):
    """Forward of :class:`GroupedGLU` one expert at a time: only ``h_NH`` is ``[N, *]``-sized."""
    N = sum(counts)
    h_NH = x_SD.new_empty(N, w_up.shape[1])
    y = (x_SD.new_zeros(num_out, w_down.shape[1]) if num_out is not None
         else x_SD.new_empty(N, w_down.shape[1]))
    start = 0
    for e, n in enumerate(counts):
        if not n:
            continue
        sl = slice(start, start + n)
        x_n = gather_rows(x_SD, rows_N[sl]) if rows_N is not None else x_SD[sl]
        torch.mm(x_n, w_up[e].t(), out=h_NH[sl])
        a_n = _act_fwd(h_NH[sl], act, gated)
        if weight_N is not None:
            a_n.mul_(weight_N[sl].to(a_n.dtype).unsqueeze(1))
        if num_out is not None:
            y.index_add_(0, rows_N[sl], a_n @ w_down[e].t())
        else:
            torch.mm(a_n, w_down[e].t(), out=y[sl])
        start += n
    return h_NH, y


def _backward_by_expert(ctx, g_out, x_SD, w_up, w_down, weight_N, rows_N, h_NH):
    """Backward of :class:`GroupedGLU` one expert at a time (temporaries O(rows of one expert))."""
    need, counts = ctx.needs_input_grad, ctx.plan[0]
    E = w_up.shape[0]
    alloc = torch.zeros if 0 in counts else torch.empty
    g_wup = alloc(w_up.shape, dtype=w_up.dtype, device=w_up.device) if need[1] else None
    g_wdown = alloc(w_down.shape, dtype=w_down.dtype, device=w_down.device) if need[2] else None
    g_weight = torch.zeros_like(weight_N) if weight_N is not None and need[3] else None
    g_x = torch.zeros_like(x_SD) if need[0] else None
    swiglu = ctx.gated and ctx.act == "silu"
    start = 0
    for e in range(E):
        n = counts[e]
        if not n:
            continue
        sl = slice(start, start + n)
        start += n
        rows = rows_N[sl] if rows_N is not None else None
        g_n = gather_rows(g_out, rows) if ctx.scatter else g_out[sl]
        h_n = h_NH[sl]
        silu_n, a_n = _swiglu(h_n) if swiglu else (None, _act_fwd(h_n, ctx.act, ctx.gated))
        g_a = g_n @ w_down[e]
        if weight_N is not None:
            if g_weight is not None:
                g_weight[sl] = torch.linalg.vecdot(g_a, a_n).to(weight_N.dtype)
            w_col = weight_N[sl].to(h_NH.dtype).unsqueeze(1)
            g_a.mul_(w_col)
            g_n = g_n * w_col
        if g_wdown is not None:
            torch.mm(g_n.t(), a_n, out=g_wdown[e])
        del a_n, g_n
        g_h = _act_bwd(h_n, g_a, ctx.act, ctx.gated, silu_n)
        del g_a, silu_n
        if g_wup is not None:
            x_n = gather_rows(x_SD, rows) if rows is not None else x_SD[sl]
            torch.mm(g_h.t(), x_n, out=g_wup[e])
        if g_x is not None:
            if rows is not None:
                g_x.index_add_(0, rows, g_h @ w_up[e])
            else:
                torch.mm(g_h, w_up[e], out=g_x[sl])
    return g_x, g_wup, g_wdown, g_weight


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


#: Largest ``[N, max(D, H)]`` temporary (bytes) for which the loop plan runs on whole row blocks (one
#: gather, one activation and one scaling for all experts, a matmul per expert); larger inputs go one
#: expert at a time so that temporaries stay O(rows of one expert).
BATCH_ROWS_MAX_BYTES = 64 << 20


#: Below this size of the gathered input ``[N, D]`` (bytes), the forward keeps it and the gate activation for
#: backward instead of gathering and recomputing them again (small inputs, where every pass counts: 2% of
#: the demo layer's expert time); above it only ``h_NH`` is kept.
KEEP_GATHERED_MAX_BYTES = 16 << 20


def _keep_for_backward(x_ND: Tensor) -> bool:
    return x_ND.numel() * x_ND.element_size() <= KEEP_GATHERED_MAX_BYTES


def _batch_rows(rows_N: Tensor | None, x_SD: Tensor, w_up_EHD: Tensor) -> bool:
    N = rows_N.shape[0] if rows_N is not None else x_SD.shape[0]
    return N * max(x_SD.shape[1], w_up_EHD.shape[1]) * x_SD.element_size() <= BATCH_ROWS_MAX_BYTES


def gather_rows(x_SD: Tensor, rows_N: Tensor) -> Tensor:
    """``x_SD[rows_N]`` as one ``embedding`` lookup (a plain row gather; ``aten::index`` is slower on CPU)."""
    return F.embedding(rows_N, x_SD)


def _plan(counts_E: Tensor, use_grouped: bool):
    if use_grouped:
        return None, torch.cumsum(counts_E, 0).to(torch.int32)
    return counts_E.tolist(), None


def grouped_glu(x_SD: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor, counts_E: Tensor, activation: str,
                gated: bool, rows_N: Tensor | None = None, weight_N: Tensor | None = None,
                num_out: int | None = None) -> Tensor:
    """Run :class:`GroupedGLU` in the compute dtype (autocast's, if on); grouped_mm where usable (on CPU for
    inputs under :data:`BATCH_ROWS_MAX_BYTES`: one call per projection instead of a Python loop over the
    experts, 12.1 vs 13.6 ms for the six matmul families of the demo layer, 1 thread)."""
    dt = B.compute_dtype(x_SD, w_up_EHD)
    n_rows = rows_N.shape[0] if rows_N is not None else x_SD.shape[0]  # grouped_mm rejects 0 rows
    use_grouped = (n_rows > 0 and B.grouped_mm_usable(x_SD.device, dt)
                   and B.grouped_mm_aligned(x_SD, w_up_EHD, w_down_EDF, dtype=dt)
                   and (x_SD.device.type != "cpu" or _batch_rows(rows_N, x_SD, w_up_EHD)))
    return GroupedGLU.apply(x_SD.to(dt), w_up_EHD.to(dt), w_down_EDF.to(dt), weight_N, rows_N, counts_E, num_out,
                            activation, gated, use_grouped)


@B.register_backend("fused")
def fused_backend(x_ND: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                  activation: str, gated: bool) -> Tensor:
    """Custom-autograd grouped FFN: saves only [N, H], preallocated per-expert matmuls (ScatterMoE-style)."""
    return grouped_glu(x_ND, w_up_EHD, w_down_EDF, counts_E, activation, gated)
