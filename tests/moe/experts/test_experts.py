"""Expert collections (docs/design.md, Experts): every backend equals ``loop`` in float64, segmentation,
per-expert state."""

from __future__ import annotations

import pytest
import torch

import moesaic
from moesaic.core.types import DispatchPlan
from moesaic.moe.experts.backends import BACKENDS
from moesaic.moe.experts.kernels import StackedFFN

E, D, F = 4, 16, 32


def run(name, x, counts, w_up, w_down, act, gated):
    for t in (x, w_up, w_down):
        t.grad = None
    y = BACKENDS.get(name).rows(x, counts, StackedFFN(w_up, w_down, act, gated))
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad.clone(), w_up.grad.clone(), w_down.grad.clone()


@pytest.mark.parametrize("gated,act", [(True, "silu"), (True, "gelu"), (False, "gelu"), (False, "relu")])
@pytest.mark.parametrize("name", [n for n in BACKENDS.names() if n != "loop"])
def test_every_backend_equals_loop_in_float64(name, gated, act):
    counts = torch.tensor([5, 0, 9, 2])
    x = torch.randn(16, D, dtype=torch.float64, requires_grad=True)
    H = 2 * F if gated else F
    w_up = (torch.randn(E, H, D, dtype=torch.float64) / D**0.5).requires_grad_()
    w_down = (torch.randn(E, D, F, dtype=torch.float64) / F**0.5).requires_grad_()
    ref = run("loop", x, counts, w_up, w_down, act, gated)
    got = run(name, x, counts, w_up, w_down, act, gated)
    for what, r, g in zip(("y", "dx", "dw_up", "dw_down"), ref, got):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12, msg=f"{name} {what}")


@pytest.mark.parametrize("kind", ["glu", "mlp"])
def test_expert_state_round_trip(kind):
    ex = moesaic.moe_layer(D, F, E, 2, experts={"kind": kind}).experts
    names = ex.stacked_names()
    assert names, "stacked per-expert weights"
    st = {n: t.clone() + 1.0 for n, t in ex.expert_state(2).items()}
    ex.load_expert_state(2, st)
    for n in names:
        assert torch.equal(getattr(ex, n)[2], st[n])


def test_loop_experts_equal_separate_ffns():
    """Stacked weights: expert e is act(x W_gate_e) * (x W_up_e) W_down_e with gate rows first."""
    layer = moesaic.moe_layer(D, F, E, 2, experts={"kind": "glu", "backend": "loop"}).double()
    ex = layer.experts
    x = torch.randn(6, D, dtype=torch.float64)
    for e in range(E):
        counts = torch.zeros(E, dtype=torch.long)
        counts[e] = 6
        gate, up = ex.w_up_EHD[e, :F], ex.w_up_EHD[e, F:]
        ref = (torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ ex.w_down_EDF[e].t()
        torch.testing.assert_close(ex(x, DispatchPlan.grouped(counts)), ref, rtol=0, atol=1e-12)


def test_fine_grained_segmentation_keeps_params_and_active_width():
    coarse = moesaic.moe_layer(D, F, E, 2)
    fine = moesaic.moe_layer(D, F, E, 2, granularity=4)
    assert fine.num_experts == 4 * E and fine.top_k == 4 * 2 and fine.experts.d_ff == F // 4
    n = lambda m: sum(p.numel() for p in m.experts.parameters())  # noqa: E731
    assert n(fine) == n(coarse)
    fine(torch.randn(5, D))
    assert fine.last_stats["assignments"] == 5 * 8
