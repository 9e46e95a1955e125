"""``grouped_mm``: one ``torch._grouped_mm`` per projection over the expert groups."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moesaic.moe.experts.backends import BACKENDS, Backend
from moesaic.moe.experts.backends.loop import LoopBackend
from moesaic.moe.experts.kernels import (
    StackedFFN,
    compute_dtype,
    glu_or_act,
    grouped_mm,
    grouped_mm_aligned,
    grouped_mm_usable,
)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward fails on
    stride-0 (expanded) gradients such as the one ``sum()`` produces."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        return g.contiguous()


def _contiguous_grad(x: Tensor) -> Tensor:
    y: Tensor = _ContiguousGrad.apply(x)  # type: ignore[no-untyped-call]
    return y


@BACKENDS.register("grouped_mm")
class GroupedMMBackend(Backend):
    """``torch._grouped_mm`` over the expert groups (one kernel per projection); ``loop`` where unusable."""

    @classmethod
    def rows(cls, x_ND: Tensor, counts_E: Tensor, ffn: StackedFFN) -> Tensor:
        w_up_EHD, w_down_EDF = ffn.w_up_EHD, ffn.w_down_EDF
        dt = compute_dtype(x_ND, w_up_EHD)
        if not (x_ND.shape[0] and grouped_mm_usable(x_ND.device, dt)
                and grouped_mm_aligned(x_ND, w_up_EHD, w_down_EDF, dtype=dt)):  # its backward fails on 0 rows
            return LoopBackend.rows(x_ND, counts_E, ffn)
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        h_NH = grouped_mm(_contiguous_grad(x_ND.to(dt)), w_up_EHD.to(dt).transpose(1, 2), offs_E)
        a_NF = _contiguous_grad(glu_or_act(h_NH, ffn.activation, ffn.gated).contiguous())
        return _contiguous_grad(grouped_mm(a_NF, w_down_EDF.to(dt).transpose(1, 2), offs_E))
