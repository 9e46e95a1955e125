"""Expert-choice routing (Zhou et al. 2022): k_c tokens per expert, brute force, permutation, padding, causality."""

from __future__ import annotations

import pytest
import torch

import moesaic
from moesaic.core.errors import CausalityError
from moesaic.core.types import DispatchPlan
from moesaic.moe.routing.expert_choice import ExpertChoiceRouter, ExpertChoiceRouterConfig, expert_capacity

D, F, E, T = 16, 32, 4, 24


def layer(**router):
    m = moesaic.moe_layer(D, F, E, 2, router={"kind": "expert_choice", **router},
                          experts={"backend": "loop"}).double()
    with torch.no_grad():
        m.router.weight.normal_(0, 0.5)
    return m


def test_capacity_formula():
    assert expert_capacity(24, 4, 2.0) == 12
    assert expert_capacity(10, 4, 1.0) == 3  # 2.5 rounds half up
    assert expert_capacity(3, 4, 0.5) == 1  # never 0 experts' worth when there are tokens
    assert expert_capacity(5, 4, 8.0) == 5  # capped at n
    assert expert_capacity(0, 4, 2.0) == 0
    assert expert_capacity(100, 5, 0.55) == 11 and expert_capacity(10, 4, 0.2) == 1  # 0.5 rounds up


def test_properties_1_to_3():
    m = layer()
    x = torch.randn(T, D, dtype=torch.float64)
    d = m.router(x)
    k_c = expert_capacity(T, E, 2.0)
    assert d.tokens_per_expert().tolist() == [k_c] * E  # 1: each expert processes exactly k_c tokens
    assert int(d.experts_per_token().sum()) == E * k_c  # 2
    # 3: brute force over (e, j): expert e takes its k_c best tokens by S[:, e]
    S = (x @ m.router.weight.t()).softmax(-1).detach()
    y_ref = torch.zeros_like(x)
    for e in range(E):
        order = sorted(range(T), key=lambda t: (-float(S[t, e]), t))[:k_c]
        for t in order:
            y_ref[t] += S[t, e] * m.experts(x[t:t + 1], DispatchPlan.grouped(torch.eye(E, dtype=torch.long)[e]))[0]
    torch.testing.assert_close(m(x), y_ref, rtol=0, atol=1e-12)


def test_permutation_equivariance():
    m = layer()
    x = torch.randn(T, D, dtype=torch.float64)
    perm = torch.randperm(T)
    torch.testing.assert_close(m(x[perm]), m(x)[perm], rtol=0, atol=1e-12)


def test_ties_go_to_the_lower_token_index():
    m = layer()
    with torch.no_grad():
        m.router.weight.zero_()  # all scores equal
    d = m.router(torch.randn(8, D, dtype=torch.float64))
    k_c = expert_capacity(8, E, 2.0)
    for e in range(E):
        assert sorted(d.token_idx_N[d.expert_idx_N == e].tolist()) == list(range(k_c))


def test_padding_is_never_picked_and_does_not_change_k_c():
    m = layer()
    x = torch.randn(T, D, dtype=torch.float64)
    pad = 10 * torch.randn(40, D, dtype=torch.float64)
    mask = torch.cat([torch.ones(T, dtype=torch.bool), torch.zeros(40, dtype=torch.bool)])
    d = m.router(torch.cat([x, pad]), mask)
    assert int(d.token_idx_N.max()) < T
    assert d.tokens_per_expert().tolist() == [expert_capacity(T, E, 2.0)] * E


def test_causal_use_raises_unless_fallback_opted_in():
    with pytest.raises(CausalityError, match="causal_fallback"):
        moesaic.moe_layer(D, F, E, 2, router={"kind": "expert_choice"}, causal=True)
    r = ExpertChoiceRouter(ExpertChoiceRouterConfig(causal_fallback="topk_at_eval"), D, E, 2, causal=True).double()
    x = torch.randn(T, D, dtype=torch.float64)
    r.train()
    assert r(x).tokens_per_expert().tolist() == [expert_capacity(T, E, 2.0)] * E  # expert choice in training
    r.eval()
    d = r(x)
    assert d.experts_per_token().tolist() == [2] * T  # token-choice top-2 at eval, causal per token
    S = (x @ r.weight.t()).softmax(-1)
    ids, w = d.to_topk(2)
    assert torch.equal(ids, S.topk(2, -1).indices)
    torch.testing.assert_close(w, S.topk(2, -1).values, rtol=0, atol=1e-12)
    # a token's routing no longer depends on the others
    torch.testing.assert_close(r(x[:5]).dense(), d.dense()[:5], rtol=0, atol=1e-12)
