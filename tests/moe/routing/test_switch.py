"""Switch top-1 (Fedus et al. 2021): jitter on the router input only, p_max weight, capacity, aux loss."""

from __future__ import annotations

import pytest
import torch

import moesaic
from moesaic.core.errors import ConfigError
from moesaic.core.types import DispatchPlan
from moesaic.moe.routing.switch import SwitchRouter, SwitchRouterConfig

D, F, E, T = 16, 32, 4, 40


def layer(**kw):
    m = moesaic.moe_layer(D, F, E, 1, router={"kind": "switch", **kw.pop("router", {})}, **kw).double()
    with torch.no_grad():
        m.router.weight.normal_(0, 0.5)
    return m


def brute_force(m, x, w_TE):
    """y[t] = sum_e w[t, e] * FFN_e(x[t]) with the loop backend, one token at a time."""
    ex = m.experts
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e in range(E):
            if w_TE[t, e] != 0:
                counts = torch.zeros(E, dtype=torch.long)
                counts[e] = 1
                y[t] += w_TE[t, e] * ex(x[t:t + 1], DispatchPlan.grouped(counts), backend="loop")[0]
    return y


def test_only_top_k_1_is_accepted():
    with pytest.raises(ConfigError, match="top_k"):
        moesaic.moe_layer(D, F, E, 2, router={"kind": "switch"})


def test_eval_output_is_pmax_times_the_argmax_expert():
    m = layer().eval()
    x = torch.randn(T, D, dtype=torch.float64)
    p = (x @ m.router.weight.t()).softmax(-1)
    w = torch.zeros_like(p).scatter(1, p.argmax(-1, keepdim=True), p.max(-1, keepdim=True).values)
    torch.testing.assert_close(m(x), brute_force(m, x, w), rtol=0, atol=1e-12)


def test_jitter_changes_the_router_input_only():
    m = layer().train()
    x = torch.randn(T, D, dtype=torch.float64)
    seen = {}
    m.router.register_forward_hook(lambda mod, inp, out: seen.update(d=out))
    torch.manual_seed(5)
    y = m(x)
    d = seen["d"]
    # the experts saw the unjittered x: recompute with the routing decision that was used
    torch.testing.assert_close(y, brute_force(m, x, d.dense().detach()), rtol=0, atol=1e-12)
    # the router saw x * U(1-eps, 1+eps): reproduce it from the same seed
    torch.manual_seed(5)
    noise = torch.empty_like(x).uniform_(0.99, 1.01)
    torch.testing.assert_close(d.logits_TE, (x * noise) @ m.router.weight.t(), rtol=0, atol=1e-12)
    assert not torch.allclose(d.logits_TE, x @ m.router.weight.t(), rtol=0, atol=1e-9)
    m.eval()
    torch.testing.assert_close(m.router(x).logits_TE, x @ m.router.weight.t(), rtol=0, atol=0)


def test_capacity_drops_later_tokens_to_zero_output():
    m = layer(dispatcher={"kind": "capacity", "capacity_factor": 1.0, "eval_capacity_factor": 1.0}).eval()
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[2, 0] = 10.0
    x = torch.randn(T, D, dtype=torch.float64)
    x[:, 0] = x[:, 0].abs() + 0.5  # every token prefers expert 2
    y = m(x)
    C = (T + E - 1) // E
    assert m.last_stats["dropped"] == T - C
    assert torch.equal(y[C:], torch.zeros_like(y[C:]))  # positions >= C: zero MoE output
    p = (x @ m.router.weight.t()).softmax(-1)
    w = torch.zeros_like(p)
    w[:C, 2] = p[:C, 2]
    torch.testing.assert_close(y, brute_force(m, x, w), rtol=0, atol=1e-12)


def test_no_drop_when_cf_at_least_E():
    m = layer(dispatcher={"kind": "capacity", "capacity_factor": float(E), "eval_capacity_factor": float(E)})
    x = torch.randn(T, D, dtype=torch.float64)
    m.eval()(x)
    assert m.last_stats["dropped"] == 0


def test_aux_loss_uses_top1_counts_before_capacity():
    m = layer(router={"jitter_eps": 0.0}, dispatcher={"kind": "capacity", "capacity_factor": 0.5}).train()
    x = torch.randn(T, D, dtype=torch.float64)
    m(x)
    p = (x @ m.router.weight.t()).softmax(-1)
    f = torch.bincount(p.argmax(-1), minlength=E).double() / T
    ref = 0.01 * E * (f * p.mean(0)).sum()
    torch.testing.assert_close(m.aux_losses["balance"], ref, rtol=0, atol=1e-12)
    assert m.last_stats["dropped"] > 0


def test_top1_router_gets_a_nonzero_gradient_from_the_output():
    m = layer(router={"aux_loss_coef": 0.0})
    m(torch.randn(T, D, dtype=torch.float64)).square().sum().backward()
    assert float(m.router.weight.grad.norm()) > 0


def test_init_is_the_papers_small_truncated_normal():
    r = SwitchRouter(SwitchRouterConfig(), 64, 512, 1)
    std = (0.1 / 64) ** 0.5
    w = r.weight.detach()
    assert float(w.abs().max()) <= 2 * std + 1e-7
    assert 0.7 * std < float(w.std()) < 1.0 * std  # truncation at 2 std shrinks the std to ~0.88
