"""``bmm``: every expert padded to the largest row count, one batched matmul per projection (Tutel's
``cf=0`` mode; Hwang et al. 2023, "Tutel: Adaptive Mixture-of-Experts at Scale")."""

from __future__ import annotations

import torch
from torch import Tensor

from moesaic.moe.experts.backends import BACKENDS, Backend
from moesaic.moe.experts.kernels import StackedFFN, compute_dtype, glu_or_act


@BACKENDS.register("bmm")
class BmmBackend(Backend):
    """Padded batched matmul: every expert padded to the largest count; for balanced loads."""

    @classmethod
    def rows(cls, x_ND: Tensor, counts_E: Tensor, ffn: StackedFFN) -> Tensor:
        return cls.padded_rows(x_ND, counts_E, ffn, int(counts_E.max()) if x_ND.shape[0] else 0)

    @classmethod
    def padded_rows(cls, x_ND: Tensor, counts_E: Tensor, ffn: StackedFFN, C: int) -> Tensor:
        """:meth:`rows` with every expert padded to ``C >= max(counts_E)`` rows. A row's result depends on the
        row count of its matmul (BLAS picks another kernel for 1 row than for 2: MKL on AMD EPYC differs in
        the last bit), so a caller computing a subset of the experts (offloaded experts) passes the plan's C."""
        w_up_EHD, w_down_EDF = ffn.w_up_EHD, ffn.w_down_EDF
        E, N, D = w_up_EHD.shape[0], x_ND.shape[0], x_ND.shape[1]
        with torch.no_grad():
            start_E = torch.cumsum(counts_E, 0) - counts_E
            expert_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), counts_E, output_size=N)
            slot_N = expert_N * C + torch.arange(N, device=x_ND.device) - start_E[expert_N]
        dt = compute_dtype(x_ND, w_up_EHD)
        x_pad = x_ND.new_zeros(E * C, D, dtype=dt).index_copy(0, slot_N, x_ND.to(dt))
        h = glu_or_act(torch.bmm(x_pad.view(E, C, D), w_up_EHD.to(dt).transpose(1, 2)), ffn.activation, ffn.gated)
        y_ECD = torch.bmm(h, w_down_EDF.to(dt).transpose(1, 2))
        return y_ECD.reshape(E * C, w_down_EDF.shape[1]).index_select(0, slot_N)
