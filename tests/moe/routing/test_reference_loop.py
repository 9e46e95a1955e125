"""Every standard router against a naive per-token Python loop in float64: the routing map
exactly equal, weights within 1e-12. Stochastic routers are replayed from the same seed."""

from __future__ import annotations

import math

import pytest
import torch

from moesaic.moe.routing.expert_choice import ExpertChoiceRouter, ExpertChoiceRouterConfig, expert_capacity
from moesaic.moe.routing.gshard import GShardRouter, GShardRouterConfig
from moesaic.moe.routing.noisy_topk import NoisyTopKRouter, NoisyTopKRouterConfig
from moesaic.moe.routing.switch import SwitchRouter, SwitchRouterConfig
from moesaic.moe.routing.topk import TopKRouter, TopKRouterConfig

D, E, T = 12, 6, 16


def build(cls, cfg, k):
    r = cls(cfg, D, E, k).double()
    with torch.no_grad():
        for p in r.parameters():
            p.normal_(0, 0.5)
    return r


def top(scores, k):
    """Indices of the k largest scores, ties to the lower index (as stable_topk)."""
    return sorted(range(len(scores)), key=lambda e: (-scores[e], e))[:k]


def softmax(v):
    m = max(v)
    ex = [math.exp(a - m) for a in v]
    return [a / sum(ex) for a in ex]


def sigmoid(v):
    return [1 / (1 + math.exp(-a)) for a in v]


def logits_of(x_t, W):
    return [float(sum(x_t[d] * W[e, d] for d in range(x_t.shape[0]))) for e in range(W.shape[0])]


def check(decision, ref_rows):
    """``ref_rows[t]`` = {expert: weight}; compares the routing map exactly and the weights to 1e-12."""
    dense = decision.dense().detach()
    for t, row in enumerate(ref_rows):
        got = {int(e) for e in (dense[t] != 0).nonzero().flatten()}
        assert got == set(row), (t, got, row)
        for e, w in row.items():
            assert abs(float(dense[t, e]) - w) < 1e-12, (t, e)


@pytest.mark.parametrize("score_func,norm,k,scale", [
    ("softmax", "none", 2, 1.0), ("softmax", "renorm", 2, 1.0), ("softmax", "softmax_topk", 3, 1.0),
    ("sigmoid", "renorm", 2, 2.5), ("sigmoid", "none", 1, 1.0)])
def test_topk_router(score_func, norm, k, scale):
    r = build(TopKRouter, TopKRouterConfig(score_func=score_func, normalization=norm, routed_scaling_factor=scale), k)
    x = torch.randn(T, D, dtype=torch.float64)
    W = r.weight.detach()
    rows = []
    for t in range(T):
        z = logits_of(x[t], W)
        s = softmax(z) if score_func == "softmax" else sigmoid(z)
        ids = top(s, k)
        if norm == "none":
            w = [s[e] for e in ids]
        elif norm == "renorm":
            w = [s[e] / sum(s[i] for i in ids) for e in ids]
        else:
            w = softmax([z[e] for e in ids])
        rows.append({e: scale * wi for e, wi in zip(ids, w)})
    check(r(x), rows)


@pytest.mark.parametrize("train", [False, True])
def test_noisy_topk_router(train):
    k = 2
    r = build(NoisyTopKRouter, NoisyTopKRouterConfig(), k).train(train)
    x = torch.randn(T, D, dtype=torch.float64)
    torch.manual_seed(7)
    d = r(x)
    torch.manual_seed(7)
    noise = torch.randn(T, E, dtype=torch.float64)
    rows = []
    for t in range(T):
        z = logits_of(x[t], r.weight.detach())
        if train:
            sig = [math.log1p(math.exp(a)) + 1e-2 for a in logits_of(x[t], r.w_noise.detach())]
            z = [z[e] + float(noise[t, e]) * sig[e] for e in range(E)]
        ids = top(z, k)
        rows.append(dict(zip(ids, softmax([z[e] for e in ids]))))
    check(d, rows)


@pytest.mark.parametrize("train", [False, True])
def test_switch_router(train):
    r = build(SwitchRouter, SwitchRouterConfig(), 1).train(train)
    x = torch.randn(T, D, dtype=torch.float64)
    torch.manual_seed(3)
    d = r(x)
    torch.manual_seed(3)
    jitter = torch.empty(T, D, dtype=torch.float64).uniform_(0.99, 1.01)
    rows = []
    for t in range(T):
        xt = x[t] * jitter[t] if train else x[t]
        p = softmax(logits_of(xt, r.weight.detach()))
        e = top(p, 1)[0]
        rows.append({e: p[e]})
    check(d, rows)


@pytest.mark.parametrize("train", [False, True])
def test_gshard_router(train):
    r = build(GShardRouter, GShardRouterConfig(theta=0.3), 2).train(train)
    x = torch.randn(T, D, dtype=torch.float64)
    torch.manual_seed(5)
    d = r(x)
    torch.manual_seed(5)
    u = torch.rand(T, dtype=torch.float64)
    rows = []
    for t in range(T):
        p = softmax(logits_of(x[t], r.weight.detach()))
        e1, e2 = top(p, 2)
        g1, g2 = p[e1] / (p[e1] + p[e2]), p[e2] / (p[e1] + p[e2])
        keep = (not train) or float(u[t]) < min(1.0, g2 / 0.3)
        rows.append({e1: g1, e2: g2} if keep else {e1: g1})
    check(d, rows)


def test_expert_choice_router():
    r = build(ExpertChoiceRouter, ExpertChoiceRouterConfig(capacity_factor=1.5), 2)
    x = torch.randn(T, D, dtype=torch.float64)
    S = [softmax(logits_of(x[t], r.weight.detach())) for t in range(T)]
    k_c = expert_capacity(T, E, 1.5)
    rows = [dict() for _ in range(T)]
    for e in range(E):
        for t in top([S[t][e] for t in range(T)], k_c):
            rows[t][e] = S[t][e]
    check(r(x), rows)
