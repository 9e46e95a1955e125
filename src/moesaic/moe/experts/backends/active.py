"""``active``: the decode backend, a loop over the experts that received rows only."""

from __future__ import annotations

from torch import Tensor

from moesaic.moe.experts.backends import BACKENDS, Backend
from moesaic.moe.experts.backends.loop import per_expert
from moesaic.moe.experts.kernels import StackedFFN, compute_dtype


@BACKENDS.register("active")
class ActiveBackend(Backend):
    """Decode path: loop over the experts that have rows only; idle experts' weights are never read."""

    @classmethod
    def rows(cls, x_ND: Tensor, counts_E: Tensor, ffn: StackedFFN) -> Tensor:
        if x_ND.shape[0] == 0:
            dt = compute_dtype(x_ND, ffn.w_up_EHD)
            y_ND = x_ND.new_empty(0, ffn.w_down_EDF.shape[1], dtype=dt)
            return y_ND + 0 * (ffn.w_up_EHD.sum() + ffn.w_down_EDF.sum()).to(dt)  # keep the weights in the graph
        return per_expert(x_ND, counts_E, ffn, skip_empty=True)
