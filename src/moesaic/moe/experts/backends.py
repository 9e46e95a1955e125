"""Compute backends for stacked-weight FFN experts, chosen by name (systems.md §2.2).

A backend computes ``y_ND = down_e(act(up_e(x_ND)))`` for every expert e on its rows (rows grouped by
expert, ``counts_E[e]`` rows for expert e). ``w_up_EHD`` is ``[E, H, D]`` (``H = 2F`` for gated experts:
gate rows first, then up rows, as Hugging Face's fused ``gate_up_proj``), ``w_down_EDF`` is ``[E, D, F]``.

* ``loop``: the readable reference, one matmul pair per expert (plain autograd).
* ``grouped_mm``: ``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm`` (one kernel per projection),
  probed once per (device type, dtype); unaligned shapes (rows not a multiple of 16 bytes) fall back to
  ``loop``; the incoming gradient is made contiguous (its backward fails on stride-0 gradients).
* ``bmm``: pad every expert to the largest count and run ``torch.bmm`` (Tutel ``cf=0``): good when the
  load is balanced, wasteful otherwise.
* ``active``: the decode path: a loop over the experts that received rows only, so only the active
  experts' weights are read; no ``[N, H, D]`` weight gather.
* ``fused``: :class:`moesaic.moe.experts.grouped_glu.GroupedGLU`, a custom autograd function that saves only
  the up-projection output ``[N, H]`` (the activation is recomputed in backward), writes the per-expert
  matmuls into preallocated buffers and, through the layer's fused path, also folds the dispatch gather
  and the weighted combine scatter into the same function (no extra ``[N, D]`` tensors kept).

``auto`` (the default, :func:`choose_backend`) resolves per call:

1. ``active`` when ``N <= E / 2`` (decode: few rows against many experts, most experts idle);
2. ``fused`` otherwise: on the 2-core CPU it measured 1.02-1.12x faster than transformers' grouped_mm
   path at T=2048 and uses the least memory (fwd+bwd peak 0.35x the dense limit's at T=8192, E=64, k=8;
   docs/benchmarks.md); its matmuls run through ``grouped_mm`` where the probe passes (on CPU only while
   the row temporaries are small, see :data:`moesaic.moe.experts.grouped_glu.BATCH_ROWS_MAX_BYTES`), and
   one expert at a time otherwise.

Set ``experts.backend`` in the config to force one; ``benchmarks/bench_layer.py`` measures them all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moesaic.core.activations import ACTIVATIONS

Backend = Callable[[Tensor, Tensor, Tensor, Tensor, str, bool], Tensor]
BACKENDS: dict[str, Backend] = {}


def register_backend(name: str):
    def deco(fn: Backend) -> Backend:
        BACKENDS[name] = fn
        return fn

    return deco


def glu_or_act(h_NH: Tensor, activation: str, gated: bool) -> Tensor:
    act = ACTIVATIONS[activation]
    if gated:
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        return act(gate_NF) * up_NF
    return act(h_NH)


def compute_dtype(x: Tensor, *weights: Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: the autocast dtype when autocast is on for x's device."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) and x.is_floating_point():
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(x.dtype, weights[0].dtype) if weights else x.dtype


def _per_expert(x_ND: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor, activation: str,
                gated: bool, skip_empty: bool) -> Tensor:
    outs, start = [], 0
    # unbind once: indexing w[e] per expert would allocate a full [E, ...] zero gradient per expert (E^2)
    ups, downs = w_up_EHD.unbind(0), w_down_EDF.unbind(0)
    for e, n in enumerate(counts_E.tolist()):
        if n or not skip_empty:
            h_nF = glu_or_act(x_ND[start:start + n] @ ups[e].t(), activation, gated)
            outs.append(h_nF @ downs[e].t())
        start += n
    return torch.cat(outs, 0)


@register_backend("loop")
def loop_backend(x_ND: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                 activation: str, gated: bool) -> Tensor:
    """Reference: a Python loop over experts. Experts without rows still join the graph (zero grads)."""
    return _per_expert(x_ND, counts_E, w_up_EHD, w_down_EDF, activation, gated, skip_empty=False)


@register_backend("active")
def active_backend(x_ND: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                   activation: str, gated: bool) -> Tensor:
    """Decode path: loop over the experts that have rows only; idle experts' weights are never read."""
    dt = compute_dtype(x_ND, w_up_EHD)
    y_ND = x_ND.new_empty(x_ND.shape[0], w_down_EDF.shape[1], dtype=dt)
    if x_ND.shape[0] == 0:
        return y_ND + 0 * (w_up_EHD.sum() + w_down_EDF.sum()).to(dt)  # keep the weights in the graph
    return _per_expert(x_ND, counts_E, w_up_EHD, w_down_EDF, activation, gated, skip_empty=True)


@register_backend("bmm")
def bmm_backend(x_ND: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                activation: str, gated: bool) -> Tensor:
    """Padded batched matmul: every expert padded to the largest count (Tutel cf=0); for balanced loads."""
    E, N, D = w_up_EHD.shape[0], x_ND.shape[0], x_ND.shape[1]
    with torch.no_grad():
        C = int(counts_E.max()) if N else 0
        start_E = torch.cumsum(counts_E, 0) - counts_E
        expert_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), counts_E, output_size=N)
        slot_N = expert_N * C + torch.arange(N, device=x_ND.device) - start_E[expert_N]
    dt = compute_dtype(x_ND, w_up_EHD)
    x_pad = x_ND.new_zeros(E * C, D, dtype=dt).index_copy(0, slot_N, x_ND.to(dt))
    h = glu_or_act(torch.bmm(x_pad.view(E, C, D), w_up_EHD.to(dt).transpose(1, 2)), activation, gated)
    y_ECD = torch.bmm(h, w_down_EDF.to(dt).transpose(1, 2))
    return y_ECD.reshape(E * C, w_down_EDF.shape[1]).index_select(0, slot_N)


# ---------------------------------------------------------------------------------------- grouped_mm
_GMM_FN = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GMM_OK: dict[tuple[str, torch.dtype], bool] = {}


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    """Forward, backward and the weight-gradient (2-D x 2-D) form, against plain matmuls."""
    if _GMM_FN is None:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 8, generator=g).to(device, dtype).requires_grad_()
        w = torch.randn(3, 8, 8, generator=g).to(device, dtype).requires_grad_()
        offs = torch.tensor([3, 3, 8], dtype=torch.int32, device=device)
        y = _GMM_FN(x, w, offs=offs)
        ref = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        wg = _GMM_FN(x.detach().t(), y.detach(), offs=offs)
        if not (torch.allclose(y, ref, atol=tol, rtol=tol) and float(wg[1].abs().max()) == 0.0):
            return False
        y.backward(torch.ones_like(y))
        return x.grad is not None and bool(torch.isfinite(x.grad).all())
    except Exception:  # noqa: BLE001 - any failure means "not usable on this build/device/dtype"
        return False


def grouped_mm_usable(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _GMM_OK:
        _GMM_OK[key] = _probe(device, dtype)
    return _GMM_OK[key]


# Probed at import on CPU (CUDA is probed on first use, so importing never initialises CUDA).
GROUPED_MM = _GMM_FN if grouped_mm_usable(torch.device("cpu"), torch.float32) else None
for _dt in (torch.bfloat16, torch.float16):
    grouped_mm_usable(torch.device("cpu"), _dt)


def grouped_mm_aligned(x_ND: Tensor, *weights: Tensor, dtype: torch.dtype | None = None) -> bool:
    """grouped_mm needs 16-byte aligned row strides for every operand, also in the backward."""
    size = torch.empty((), dtype=dtype or x_ND.dtype).element_size()
    dims = {x_ND.shape[-1]} | {d for w in weights for d in w.shape[1:]}
    return all((d * size) % 16 == 0 for d in dims)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward fails on
    stride-0 (expanded) gradients such as the one ``sum()`` produces."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return g.contiguous()


@register_backend("grouped_mm")
def grouped_mm_backend(x_ND: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                       activation: str, gated: bool) -> Tensor:
    """``torch._grouped_mm`` over the expert groups (one kernel per projection); loop if unusable."""
    dt = compute_dtype(x_ND, w_up_EHD)
    if not (x_ND.shape[0] and grouped_mm_usable(x_ND.device, dt)
            and grouped_mm_aligned(x_ND, w_up_EHD, w_down_EDF, dtype=dt)):  # its backward fails on 0 rows
        return loop_backend(x_ND, counts_E, w_up_EHD, w_down_EDF, activation, gated)
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    x = _ContiguousGrad.apply(x_ND.to(dt))
    h_NH = _GMM_FN(x, w_up_EHD.to(dt).transpose(1, 2), offs=offs_E)
    h_NF = _ContiguousGrad.apply(glu_or_act(h_NH, activation, gated).contiguous())
    y_ND = _GMM_FN(h_NF, w_down_EDF.to(dt).transpose(1, 2), offs=offs_E)
    return _ContiguousGrad.apply(y_ND)


def decode_rule(num_rows: int, num_experts: int) -> bool:
    """Few rows against many experts: most experts idle, so touch only the active ones."""
    return 2 * num_rows <= num_experts


def resolve_backend(name: str, num_rows: int, num_experts: int) -> str:
    """Resolve ``auto`` (rule in the module docstring) from the row and expert counts."""
    if name != "auto":
        return name
    return "active" if decode_rule(num_rows, num_experts) else "fused"


def choose_backend(name: str, x_ND: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor) -> str:
    """Resolve ``auto`` for these rows and weights; any other name is returned unchanged."""
    return resolve_backend(name, x_ND.shape[0], w_up_EHD.shape[0])


from moesaic.moe.experts import grouped_glu as _grouped_glu  # noqa: E402,F401  (registers ``fused``)
