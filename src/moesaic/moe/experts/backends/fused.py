"""``fused``: gather -> grouped FFN -> weighted scatter in one autograd function (ScatterMoE: Tan et al.
2024, "Scattered Mixture-of-Experts Implementation"); see :mod:`moesaic.moe.experts.grouped_glu`."""

from __future__ import annotations

from torch import Tensor

from moesaic.core.types import DispatchPlan
from moesaic.moe.experts.backends import BACKENDS, Backend
from moesaic.moe.experts.grouped_glu import grouped_glu
from moesaic.moe.experts.kernels import StackedFFN


@BACKENDS.register("fused")
class FusedBackend(Backend):
    """Custom-autograd grouped FFN with the plan's gather and weighted scatter folded in (ScatterMoE-style)."""

    @classmethod
    def rows(cls, x_ND: Tensor, counts_E: Tensor, ffn: StackedFFN) -> Tensor:
        return grouped_glu(x_ND, ffn, counts_E)

    @classmethod
    def run(cls, x_TD: Tensor, plan: DispatchPlan, ffn: StackedFFN) -> Tensor:
        if plan.slots is not None:  # Soft MoE: rows are slot mixes, not token rows; mix, then compute
            return super().run(x_TD, plan, ffn)
        return grouped_glu(x_TD, ffn, plan.counts_E, rows_N=plan.token_idx_N, weight_N=plan.weight_N,
                           num_out=plan.num_tokens)
