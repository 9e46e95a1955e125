"""Building blocks of the stacked-FFN expert backends: the weights bundle, activations, compute dtype, and
``torch._grouped_mm`` (probed lazily, once per device type and dtype).

``w_up_EHD`` is ``[E, H, D]`` (``H = 2F`` for gated experts: gate rows first, then up rows, as Hugging
Face's fused ``gate_up_proj``), ``w_down_EDF`` is ``[E, D, F]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from moesaic.core.activations import ACTIVATIONS


class StackedFFN(NamedTuple):
    """The weights and activation of E stacked FFN experts: what a backend computes with."""

    w_up_EHD: Tensor
    w_down_EDF: Tensor
    activation: str
    gated: bool


def glu_or_act(h_NH: Tensor, activation: str, gated: bool) -> Tensor:
    """``act(gate) * up`` of ``h = [gate | up]`` (Shazeer 2020, "GLU Variants"), or ``act(h)``."""
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


GroupedMM = Callable[..., Tensor]
#: ``torch.nn.functional.grouped_mm`` (newer builds) or ``torch._grouped_mm``; None when neither exists.
GMM_FN: GroupedMM | None = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GMM_OK: dict[tuple[str, torch.dtype], bool] = {}


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    """Forward, backward and the weight-gradient (2-D x 2-D) form, against plain matmuls."""
    if GMM_FN is None:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 8, generator=g).to(device, dtype).requires_grad_()
        w = torch.randn(3, 8, 8, generator=g).to(device, dtype).requires_grad_()
        offs = torch.tensor([3, 3, 8], dtype=torch.int32, device=device)
        y = GMM_FN(x, w, offs=offs)
        ref = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        wg = GMM_FN(x.detach().t(), y.detach(), offs=offs)
        if not (torch.allclose(y, ref, atol=tol, rtol=tol) and float(wg[1].abs().max()) == 0.0):
            return False
        g_x, g_w = torch.autograd.grad(y, [x, w], torch.ones_like(y))
        return bool(torch.isfinite(g_x).all() and torch.isfinite(g_w).all())
    except Exception:  # noqa: BLE001 - any failure means "not usable on this build/device/dtype"
        return False


def grouped_mm_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether grouped_mm works (forward and backward) for this device type and dtype; probed on first
    use and cached, so importing never runs a kernel or initialises CUDA. The probe runs with autograd on
    even when the first caller is under ``no_grad``/``inference_mode`` (decoding), which would otherwise
    fail its backward check and cache False for the whole process."""
    key = (device.type, dtype)
    if key not in _GMM_OK:
        with torch.inference_mode(False), torch.enable_grad():
            _GMM_OK[key] = _probe(device, dtype)
    return _GMM_OK[key]


def grouped_mm_aligned(x_ND: Tensor, *weights: Tensor, dtype: torch.dtype | None = None) -> bool:
    """grouped_mm needs 16-byte aligned row strides for every operand, also in the backward."""
    size = torch.empty((), dtype=dtype or x_ND.dtype).element_size()
    dims = {x_ND.shape[-1]} | {d for w in weights for d in w.shape[1:]}
    return all((d * size) % 16 == 0 for d in dims)


def grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """``GMM_FN(a, b, offs=offs)``; only called after :func:`grouped_mm_usable` said yes."""
    assert GMM_FN is not None
    return GMM_FN(a, b, offs=offs)
