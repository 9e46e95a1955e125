"""GShard top-2 (Lepikhin et al. 2020): renormalised top-2, random second expert, top-1 aux, first choices first."""

from __future__ import annotations

import torch

import moesaic
from moesaic.core.types import DispatchPlan
from moesaic.moe.dispatch.capacity import slot_positions
from moesaic.moe.routing.gshard import GShardRouter, GShardRouterConfig

D, F, E, T = 16, 32, 4, 40


def router(**cfg):
    r = GShardRouter(GShardRouterConfig(**cfg), D, E, 2).double()
    with torch.no_grad():
        r.weight.normal_(0, 0.5)
    return r


def test_weights_are_renormalised_top2_and_eval_keeps_both():
    r = router().eval()
    x = torch.randn(T, D, dtype=torch.float64)
    ids, w = r(x).to_topk(2)
    p = (x @ r.weight.t()).softmax(-1)
    top = p.topk(2, -1)
    assert torch.equal(ids, top.indices)
    torch.testing.assert_close(w, top.values / top.values.sum(-1, keepdim=True), rtol=0, atol=1e-12)


def test_keep_rate_of_second_expert_at_theta_half():
    """Random routing of the second expert: theta = 0.5 and g2 = 0.3 give a keep rate of min(1, 0.3 / 0.5) = 0.6."""
    r = router(theta=0.5).train()
    torch.manual_seed(0)
    keep = r.keep_second(torch.full((20000,), 0.3, dtype=torch.float64))
    assert abs(float(keep.double().mean()) - 0.6) < 0.015
    assert bool(r.keep_second(torch.full((100,), 0.6, dtype=torch.float64)).all())  # g2 >= theta: always kept
    r.eval()
    assert bool(r.keep_second(torch.full((100,), 0.01, dtype=torch.float64)).all())


def test_dropped_second_choice_keeps_g1_unrenormalised():
    r = router(theta=0.5).train()
    x = torch.randn(400, D, dtype=torch.float64)
    torch.manual_seed(3)
    d = r(x)
    ids, w = d.to_topk(2)
    p = (x @ r.weight.t()).softmax(-1)
    top = p.topk(2, -1)
    g = top.values / top.values.sum(-1, keepdim=True)
    dropped = ids[:, 1] < 0
    assert 0 < int(dropped.sum()) < 400
    torch.testing.assert_close(w[:, 0], g[:, 0], rtol=0, atol=1e-12)  # g1 never renormalised to 1
    assert bool((w[dropped, 0] < 1).all())
    # reproduce the random rule from the same seed: keep with prob min(1, g2 / theta)
    torch.manual_seed(3)
    u = torch.rand(400, dtype=torch.float64)
    assert torch.equal(~dropped, u < (g[:, 1] / 0.5).clamp(max=1))


def test_aux_loss_counts_top1_only():
    r = router(theta=0.2).train()
    x = torch.randn(T, D, dtype=torch.float64)
    d = r(x)
    p = (x @ r.weight.t()).softmax(-1)
    f1 = torch.bincount(p.argmax(-1), minlength=E).double() / T
    torch.testing.assert_close(d.aux_losses["balance"], E * (f1 * p.mean(0)).sum(), rtol=0, atol=1e-12)
    with torch.no_grad():
        r.weight.zero_()
    u = r(torch.randn(E * 10, D, dtype=torch.float64))
    # uniform p (zero weights): P_e = 1/E whatever f is, so E * sum_e f_e / E = 1
    assert abs(float(u.aux_losses["balance"].detach()) - 1.0) < 1e-12


def test_second_choices_queue_after_first_choices():
    """Capacity: in every expert, every second-choice slot comes after every first-choice slot."""
    r = router().eval()
    d = r(torch.randn(64, D, dtype=torch.float64))
    pos = slot_positions(d)
    for e in range(E):
        in_e = d.expert_idx_N == e
        first, second = pos[in_e & (d.choice_N == 0)], pos[in_e & (d.choice_N == 1)]
        if first.numel() and second.numel():
            assert int(second.min()) > int(first.max())


def test_theta_to_zero_large_cf_equals_brute_force():
    m = moesaic.moe_layer(D, F, E, 2, router={"kind": "gshard", "random_at_eval": True, "theta": 1e-9},
                          dispatcher={"kind": "capacity", "capacity_factor": 4.0, "eval_capacity_factor": 4.0},
                          experts={"backend": "loop"}).double().eval()
    x = torch.randn(T, D, dtype=torch.float64)
    y = m(x)
    assert m.last_stats["dropped"] == 0
    p = (x @ m.router.weight.t()).softmax(-1)
    top = p.topk(2, -1)
    g = top.values / top.values.sum(-1, keepdim=True)
    y_ref = torch.zeros_like(x)
    for t in range(T):
        for j in range(2):
            e = int(top.indices[t, j])
            y_ref[t] += g[t, j] * m.experts(x[t:t + 1], DispatchPlan.grouped(torch.eye(E, dtype=torch.long)[e]))[0]
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
