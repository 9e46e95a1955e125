"""Noisy top-k gating (Shazeer et al. 2017): variant C gates, importance and smooth-load CV^2 losses."""

from __future__ import annotations

import torch

from moesaic.moe.routing import losses
from moesaic.moe.routing.noisy_topk import NoisyTopKRouter, NoisyTopKRouterConfig, smooth_load_prob

D, E, T, K = 16, 6, 32, 2


def router(k=K, E=E, randomise=True, **cfg):
    r = NoisyTopKRouter(NoisyTopKRouterConfig(**cfg), D, E, k).double()
    if randomise:
        with torch.no_grad():
            r.weight.normal_(0, 0.5)
            r.w_noise.normal_(0, 0.5)
    return r


def test_zero_init():
    r = NoisyTopKRouter(NoisyTopKRouterConfig(), D, E, K)
    assert float(r.weight.detach().abs().sum()) == 0.0 and float(r.w_noise.detach().abs().sum()) == 0.0


def test_gates_have_k_nonzeros_summing_to_one():
    r = router().train()
    G = r(torch.randn(T, D, dtype=torch.float64)).dense()
    assert ((G > 0).sum(-1) == K).all()
    torch.testing.assert_close(G.sum(-1), torch.ones(T, dtype=torch.float64), rtol=0, atol=1e-12)


def test_without_noise_gates_equal_variant_B():
    r = router().eval()
    x = torch.randn(T, D, dtype=torch.float64)
    G = r(x).dense()
    p = (x @ r.weight.t()).softmax(-1)
    top = p.topk(K, -1)
    ref = torch.zeros_like(p).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(G, ref, rtol=0, atol=1e-12)
    r2 = router(noisy=False).train()
    r2.load_state_dict(r.state_dict())
    torch.testing.assert_close(r2(x).dense(), ref, rtol=0, atol=1e-12)


def test_training_noise_matches_the_formula():
    r = router().train()
    x = torch.randn(T, D, dtype=torch.float64)
    torch.manual_seed(11)
    d = r(x)
    torch.manual_seed(11)
    clean = x @ r.weight.t()
    sigma = torch.nn.functional.softplus(x @ r.w_noise.t()) + 1e-2
    H = clean + torch.randn(T, E, dtype=torch.float64) * sigma
    top = H.topk(K, -1)
    G = torch.zeros_like(H).scatter(1, top.indices, top.values.softmax(-1))
    torch.testing.assert_close(d.dense(), G, rtol=0, atol=1e-12)
    P = smooth_load_prob(clean, H, sigma, K)
    torch.testing.assert_close(d.aux_losses["importance"], losses.cv_squared(G.sum(0)), rtol=0, atol=1e-12)
    torch.testing.assert_close(d.aux_losses["load"], losses.cv_squared(P.sum(0)), rtol=0, atol=1e-12)


def test_smooth_load_against_monte_carlo():
    """The smooth load: P[t, e] in (0, 1) and equal to Pr[e in top k] when e's noise is re-drawn (10k samples)."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(4, E, dtype=torch.float64, generator=g)
    sigma = 0.5 + torch.rand(4, E, dtype=torch.float64, generator=g)
    noisy = clean + torch.randn(4, E, dtype=torch.float64, generator=g) * sigma
    P = smooth_load_prob(clean, noisy, sigma, K)
    assert bool(((P > 0) & (P < 1)).all())
    S = 10_000
    for t in range(4):
        for e in range(E):
            h = noisy[t].expand(S, E).clone()
            h[:, e] = clean[t, e] + torch.randn(S, dtype=torch.float64, generator=g) * sigma[t, e]
            in_top = (h.topk(K, -1).indices == e).any(-1).double().mean()
            assert abs(float(in_top - P[t, e])) < 0.02, (t, e, float(in_top), float(P[t, e]))


def test_eval_load_is_the_count_and_population_variance_by_default():
    x = torch.randn(T, D, dtype=torch.float64)
    for unbiased in (False, True):
        r = router(unbiased=unbiased).eval()
        d = r(x)
        counts = d.tokens_per_expert().double()
        torch.testing.assert_close(d.aux_losses["load"], losses.cv_squared(counts, unbiased), rtol=0, atol=1e-12)
        torch.testing.assert_close(d.aux_losses["importance"], losses.cv_squared(d.dense().sum(0), unbiased),
                                   rtol=0, atol=1e-12)


def test_load_loss_skipped_when_E_equals_k():
    r = router(k=3, E=3).train()
    d = r(torch.randn(T, D, dtype=torch.float64))
    assert "load" not in d.aux_losses and "importance" in d.aux_losses


def test_losses_reach_both_weights():
    r = router().train()
    d = r(torch.randn(T, D, dtype=torch.float64))
    (d.aux_losses["importance"] + d.aux_losses["load"]).backward()
    assert float(r.weight.grad.norm()) > 0 and float(r.w_noise.grad.norm()) > 0
