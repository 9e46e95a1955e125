"""Helpers for the paper-technique tests: brute-force expert outputs."""

import pytest
import torch

from moesaic.core.types import DispatchPlan


def expert_out(layer, e: int, x_TD: torch.Tensor) -> torch.Tensor:
    """FFN_e(x) for every row, through the layer's own experts module."""
    counts = torch.zeros(layer.experts.num_experts, dtype=torch.long)
    counts[e] = x_TD.shape[0]
    return layer.experts(x_TD, DispatchPlan.grouped(counts))


def brute_force(layer, x_TD: torch.Tensor, w_TE: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum_e w[t, e] * FFN_e(x[t])`` with a dense weight matrix."""
    return sum(w_TE[:, e:e + 1].to(x_TD.dtype) * expert_out(layer, e, x_TD) for e in range(w_TE.shape[1]))


@pytest.fixture
def ref():
    class Ref:
        pass

    r = Ref()
    r.expert_out, r.brute_force = expert_out, brute_force
    return r
