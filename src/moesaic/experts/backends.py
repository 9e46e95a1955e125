"""Compute backends for stacked-weight FFN experts, chosen by name.

A backend computes ``y_ND = down_e(act(up_e(x_ND)))`` for every expert e on its rows. ``w_up_EHD`` is
``[E, H, D]`` (``H = 2F`` for gated experts: gate rows first, then up rows, as Hugging Face's fused
``gate_up_proj``), ``w_down_EDF`` is ``[E, D, F]``.

* ``loop``: the readable reference, one matmul pair per expert.
* ``grouped_mm``: ``torch._grouped_mm`` (or ``torch.nn.functional.grouped_mm``), probed at import.

``auto`` picks ``grouped_mm`` where the probe passed and the shapes are aligned, else ``loop``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moesaic.activations import ACTIVATIONS

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


@register_backend("loop")
def loop_backend(x_ND: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                 activation: str, gated: bool) -> Tensor:
    """Reference: a Python loop over experts. Experts without rows still join the graph (zero grads)."""
    outs = []
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        x_nD = x_ND[start:start + n]
        h_nF = glu_or_act(x_nD @ w_up_EHD[e].t(), activation, gated)
        outs.append(h_nF @ w_down_EDF[e].t())
        start += n
    return torch.cat(outs, 0)


def _probe_grouped_mm() -> Callable | None:
    fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        return None
    try:
        x = torch.randn(8, 8, requires_grad=True)
        w = torch.randn(2, 8, 8, requires_grad=True)
        y = fn(x, w, offs=torch.tensor([3, 8], dtype=torch.int32))
        ref = torch.cat([x[:3] @ w[0], x[3:] @ w[1]])
        if not torch.allclose(y, ref, atol=1e-4):
            return None
        y.sum().backward()
    except Exception:  # noqa: BLE001 - any failure means "not usable on this build"
        return None
    return fn


GROUPED_MM = _probe_grouped_mm()


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward fails on
    stride-0 (expanded) gradients such as the one ``sum()`` produces."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return g.contiguous()


def grouped_mm_aligned(x_ND: Tensor, *weights: Tensor) -> bool:
    """grouped_mm needs 16-byte aligned strides."""
    def ok(t: Tensor) -> bool:
        return (t.shape[-1] * t.element_size()) % 16 == 0
    return GROUPED_MM is not None and ok(x_ND) and all(ok(w) and (w.shape[-2] * w.element_size()) % 16 == 0
                                                        for w in weights)


@register_backend("grouped_mm")
def grouped_mm_backend(x_ND: Tensor, counts_E: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor,
                       activation: str, gated: bool) -> Tensor:
    """``torch._grouped_mm`` over the expert groups (one kernel per projection)."""
    if GROUPED_MM is None:
        raise RuntimeError("grouped_mm backend: torch._grouped_mm is not usable on this PyTorch build")
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    dtype = torch.get_autocast_dtype(x_ND.device.type) if torch.is_autocast_enabled(x_ND.device.type) else x_ND.dtype
    x = x_ND.to(dtype)
    h_NH = GROUPED_MM(x, w_up_EHD.to(dtype).transpose(1, 2), offs=offs_E)
    h_NF = glu_or_act(h_NH, activation, gated)
    y_ND = GROUPED_MM(h_NF.contiguous(), w_down_EDF.to(dtype).transpose(1, 2), offs=offs_E)
    return _ContiguousGrad.apply(y_ND)


def choose_backend(name: str, x_ND: Tensor, w_up_EHD: Tensor, w_down_EDF: Tensor) -> str:
    """Resolve ``auto``: grouped_mm when usable for these shapes and dtypes, else loop."""
    if name != "auto":
        return name
    if grouped_mm_aligned(x_ND, w_up_EHD, w_down_EDF) and x_ND.dtype in (torch.float32, torch.bfloat16):
        return "grouped_mm"
    return "loop"
