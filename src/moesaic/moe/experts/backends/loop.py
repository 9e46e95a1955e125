"""``loop``: the readable reference backend, one matmul pair per expert in a Python loop."""

from __future__ import annotations

import torch
from torch import Tensor

from moesaic.moe.experts.backends import BACKENDS, Backend
from moesaic.moe.experts.kernels import StackedFFN, glu_or_act


def per_expert(x_ND: Tensor, counts_E: Tensor, ffn: StackedFFN, skip_empty: bool) -> Tensor:
    """Expert e's FFN on its slice of rows, for every expert (or every expert with rows), concatenated."""
    outs, start = [], 0
    # unbind once: indexing w[e] per expert would allocate a full [E, ...] zero gradient per expert (E^2)
    ups, downs = ffn.w_up_EHD.unbind(0), ffn.w_down_EDF.unbind(0)
    for e, n in enumerate(counts_E.tolist()):
        if n or not skip_empty:
            h_nF = glu_or_act(x_ND[start:start + n] @ ups[e].t(), ffn.activation, ffn.gated)
            outs.append(h_nF @ downs[e].t())
        start += n
    return torch.cat(outs, 0)


@BACKENDS.register("loop")
class LoopBackend(Backend):
    """Reference: a Python loop over experts; experts without rows still join the graph (zero grads)."""

    @classmethod
    def rows(cls, x_ND: Tensor, counts_E: Tensor, ffn: StackedFFN) -> Tensor:
        return per_expert(x_ND, counts_E, ffn, skip_empty=False)
