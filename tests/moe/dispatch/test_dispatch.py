"""Dispatchers (docs/design.md, Dispatcher; capacity as in Switch and GShard): exact round trip, sort == capacity when
nothing drops, and the capacity grid against an independent per-expert count."""

from __future__ import annotations

import math

import pytest
import torch

import moesaic
from moesaic.core.types import RoutingDecision
from moesaic.moe.dispatch.capacity import CapacityDispatcher, CapacityDispatcherConfig, capacity
from moesaic.moe.dispatch.sort import SortDispatcher, SortDispatcherConfig

D, F, E = 16, 32, 4


def decision(T, k, adversarial=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(T, E, generator=g, dtype=torch.float64).softmax(-1)
    if adversarial:  # every token's first choice is expert 0 (then 1, ...)
        probs = torch.tensor([0.7, 0.2, 0.06, 0.04], dtype=torch.float64).expand(T, E).clone()
        probs[:, 0] += 1e-3 * torch.rand(T, generator=g, dtype=torch.float64)  # distinct confidences
    w, ids = probs.topk(k, -1)
    return RoutingDecision.from_topk(ids, w, E, probs_TE=probs)


@pytest.mark.parametrize("k", [1, 2])
def test_dispatch_then_combine_is_exact(k):
    T = 24
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    d = decision(T, k)
    disp = SortDispatcher(SortDispatcherConfig(), E, k)
    plan = disp.plan(d)
    x_ND, counts_E = plan.gather(x), plan.counts_E
    assert torch.equal(counts_E, d.tokens_per_expert())
    # rows are grouped by expert, in token order inside an expert (stable)
    tok_sorted = plan.token_idx_N
    exp_sorted = torch.arange(E).repeat_interleave(counts_E)
    assert torch.equal(x_ND, x[tok_sorted])
    for e in range(E):
        toks = tok_sorted[exp_sorted == e]
        assert torch.equal(toks, toks.sort().values)
    # identity experts with unit weights: exactly the input, k times (rtol = atol = 0)
    ones = d.replace(weight_N=torch.ones_like(d.weight_N))
    plan1 = disp.plan(ones)
    assert torch.equal(plan1.combine(plan1.gather(x)), k * x)
    # weighted: y_t = (sum of t's weights) * x_t; the gradient is the same factor
    y = plan.combine(plan.gather(x))
    torch.testing.assert_close(y, d.dense().sum(-1, keepdim=True) * x, rtol=0, atol=1e-15)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, d.dense().sum(-1, keepdim=True).expand(T, D), rtol=0, atol=1e-15)


@pytest.mark.parametrize("router", [{"kind": "topk"}, {"kind": "gshard", "random_at_eval": False}])
def test_sort_and_capacity_agree_when_capacity_is_large(router):
    sort = moesaic.moe_layer(D, F, E, 2, router=router).double()
    cap = moesaic.moe_layer(D, F, E, 2, router=router, dispatcher={"kind": "capacity", "capacity_factor": E / 2 + 1,
                                                                   "eval_capacity_factor": None}).double()
    cap.load_state_dict(sort.state_dict())
    x = torch.randn(2, 12, D, dtype=torch.float64)
    for mode in ("train", "eval"):
        getattr(sort, mode)(), getattr(cap, mode)()
        torch.manual_seed(1)
        y0 = sort(x)
        torch.manual_seed(1)
        y1 = cap(x)
        assert cap.last_stats["dropped"] == 0
        torch.testing.assert_close(y1, y0, rtol=0, atol=1e-12)


def independent_keep(d: RoutingDecision, C: int, policy: str) -> set[tuple[int, int]]:
    """Per expert: sort its assignments by (choice rank, token order | -confidence) and keep the first C."""
    kept = set()
    conf = d.probs_TE.max(-1).values
    for e in range(E):
        rows = [n for n in range(d.num_assignments) if int(d.expert_idx_N[n]) == e]
        if policy == "position":
            rows.sort(key=lambda n: (int(d.choice_N[n]), int(d.token_idx_N[n])))
        else:
            rows.sort(key=lambda n: (int(d.choice_N[n]), -float(conf[d.token_idx_N[n]])))
        kept |= {(int(d.token_idx_N[n]), e) for n in rows[:C]}
    return kept


@pytest.mark.parametrize("adversarial", [False, True], ids=["random", "adversarial"])
@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("cf", [0.25, 0.5, 1.0, 1.25, 2.0, "E/k+1"])
def test_capacity_grid(cf, k, policy, adversarial):
    """Routed <= C per expert, dropped + kept == T*k, the reported drop count equals an independent
    count, and the kept assignments are exactly the first C per expert in the policy's order."""
    T = 20
    cf = E / k + 1 if cf == "E/k+1" else cf
    d = decision(T, k, adversarial)
    disp = CapacityDispatcher(CapacityDispatcherConfig(capacity_factor=cf, drop_policy=policy), E, k).train()
    state = disp.plan(d)
    counts_E = state.counts_E
    C = min(T, math.ceil(cf * k * T / E))
    assert C == capacity(T, E, k, cf)
    assert int(counts_E.max()) <= C
    kept = int(counts_E.sum())
    assert kept + state.dropped == T * k
    overflow = sum(max(0, int(n) - C) for n in d.tokens_per_expert())
    assert state.dropped == overflow
    got = {(int(t), int(e)) for t, e in zip(state.token_idx_N, torch.arange(E).repeat_interleave(counts_E))}
    assert got == independent_keep(d, C, policy)
    if cf * k >= E:
        assert state.dropped == 0  # cf * k >= E clamps C to T without error


def test_capacity_uses_the_factor_as_written():
    assert capacity(100, 5, 1, 0.55) == 11  # float 0.55 * 100 / 5 = 11.000000000000002 -> 12 with floats
    assert capacity(200, 2, 1, 0.55) == 55 and capacity(10, 7, 1, 0.7) == 1 and capacity(10, 4, 1, 1.25) == 4
    assert capacity(8, 4, 2, 10.0) == 8  # clamped to T


def test_capacity_ignores_padding_and_reports_drops_in_the_layer():
    layer = moesaic.moe_layer(D, F, E, 1, router={"kind": "switch", "jitter_eps": 0.0},
                              dispatcher={"kind": "capacity", "capacity_factor": 1.0}).double()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[1, 0] = 5.0
    x = torch.randn(12, D, dtype=torch.float64)
    x[:, 0] = 1.0  # all to expert 1
    mask = torch.zeros(12, dtype=torch.bool)
    mask[:8] = True
    y = layer(x, mask=mask)
    C = capacity(8, E, 1, 1.0)  # valid tokens only
    assert layer.last_stats["dropped"] == 8 - C
    assert int((y.abs().sum(-1) > 0).sum()) == C


def test_capacity_sweep_is_monotone_and_reaches_zero():
    T, k = 32, 2
    d = decision(T, k, adversarial=True)
    drops = []
    for cf in [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, float(E)]:
        disp = CapacityDispatcher(CapacityDispatcherConfig(capacity_factor=cf), E, k).train()
        drops.append(disp.plan(d).dropped)
    assert all(a >= b for a, b in zip(drops, drops[1:])) and drops[-1] == 0 and drops[0] > 0


def test_eval_capacity_factor_applies_in_eval():
    d = decision(20, 1, adversarial=True)
    disp = CapacityDispatcher(CapacityDispatcherConfig(capacity_factor=0.5, eval_capacity_factor=2.0), E, 1)
    train_drop = disp.train().plan(d).dropped
    eval_drop = disp.eval().plan(d).dropped
    assert train_drop == 20 - capacity(20, E, 1, 0.5) and eval_drop == 20 - capacity(20, E, 1, 2.0)
