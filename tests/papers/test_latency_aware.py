"""ShiftAddViT latency-aware balance loss (You et al. 2023): Shazeer's loss at equal latencies, scale
invariance, zero at constant latency x load, the smooth load against Monte Carlo."""

import pytest
import torch
from scipy.stats import norm

import moesaic
from moesaic.core.errors import ConfigError
from moesaic.moe.routing.latency_aware import latency_balance
from moesaic.moe.routing.noisy_topk import smooth_load_prob

D, F = 16, 32


def layer(E=4, k=1, **router):
    return moesaic.moe_layer(D, F, E, top_k=k, router={"kind": "latency_aware", **router}).double()


def cv2(v):
    return v.var() / (v.mean() ** 2 + 1e-10)


def shazeer_reference(clean, noisy, std, k):
    """Importance + load of Shazeer et al. (2017) written out per token with scipy's normal cdf."""
    T, E = clean.shape
    p = noisy.softmax(-1)
    top = p.topk(k, -1)
    gates = torch.zeros_like(p).scatter(1, top.indices, top.values)
    load = torch.zeros(E, dtype=torch.float64)
    for t in range(T):
        srt = noisy[t].sort(descending=True).values
        for e in range(E):
            thr = srt[k] if noisy[t, e] > srt[k] else srt[k - 1]
            load[e] += norm.cdf(float((clean[t, e] - thr) / std))
    return cv2(gates.sum(0)) + cv2(load)


def test_equal_latencies_give_shazeer_importance_plus_load():
    lyr = layer(E=4, k=2, latency=[2.5, 2.5, 2.5, 2.5])
    x = torch.randn(24, D, dtype=torch.float64)
    torch.manual_seed(3)
    d = lyr.router(x)
    clean = lyr.router.logits(x)
    ref = shazeer_reference(clean.detach(), d.logits_TE.detach(), 0.25, 2)
    assert torch.allclose(d.aux_losses["balance"], ref, atol=1e-10)
    lyr2 = layer(E=4, k=2)  # latency: null
    lyr2.router.weight.data.copy_(lyr.router.weight.data)
    torch.manual_seed(3)
    assert torch.allclose(lyr2.router(x).aux_losses["balance"], ref, atol=1e-10)


def test_scaling_latencies_does_not_change_the_loss():
    g = torch.rand(32, 2, dtype=torch.float64)
    load = torch.rand(32, 2, dtype=torch.float64)
    a = latency_balance(g, load, torch.tensor([6.0, 4.0], dtype=torch.float64)).value()
    b = latency_balance(g, load, torch.tensor([60.0, 40.0], dtype=torch.float64)).value()
    assert torch.allclose(a, b, rtol=1e-9)


def test_loss_is_zero_when_latency_times_load_is_constant():
    # lambda = (6, 4): a 40/60 split of 100 tokens makes lambda * n = (240, 240)
    ids = torch.tensor([0] * 40 + [1] * 60)
    g = torch.nn.functional.one_hot(ids, 2).double()
    lam = torch.tensor([6.0, 4.0], dtype=torch.float64)
    assert latency_balance(g, g, lam).value().item() < 1e-12
    even = torch.nn.functional.one_hot(torch.tensor([0] * 50 + [1] * 50), 2).double()
    assert latency_balance(even, even, lam).value().item() > 0.01  # a 50/50 split is not latency-balanced


def test_gradient_pushes_tokens_away_from_the_slow_expert():
    torch.manual_seed(0)
    lyr = layer(E=2, k=1, latency=[6.0, 4.0], aux_loss_coef=1.0, noise_std=0.0)
    opt = torch.optim.SGD(lyr.router.parameters(), lr=0.5)
    x = torch.randn(256, D, dtype=torch.float64)
    for _ in range(150):
        lyr(x)
        opt.zero_grad()
        sum(lyr.aux_losses.values()).backward()
        opt.step()
    share0 = 1 - lyr.router.shift_ratio.item()
    assert 0.3 < share0 < 0.5  # target 0.4: the slow (x6) expert gets fewer tokens


def test_shift_ratio_is_fraction_routed_to_non_zero_experts():
    lyr = layer(E=3, k=2).eval()
    d = lyr.router(torch.randn(40, D, dtype=torch.float64))
    ids = d.to_topk()[0]
    assert lyr.router.shift_ratio.item() == pytest.approx((ids != 0).double().mean().item())


def test_gate_is_variant_a_with_noise_only_in_training():
    lyr = layer(E=4, k=2).eval()
    x = torch.randn(10, D, dtype=torch.float64)
    d = lyr.router(x)
    p = lyr.router.logits(x).softmax(-1)
    assert torch.allclose(d.dense(), torch.zeros_like(p).scatter(1, p.topk(2).indices, p.topk(2).values))
    lyr.train()
    assert not torch.equal(lyr.router(x).logits_TE, lyr.router.logits(x))


def test_prob_in_topk_monte_carlo():
    torch.manual_seed(1)
    clean = torch.randn(1, 4, dtype=torch.float64)
    std, k = 0.7, 2
    noisy = clean + torch.randn_like(clean) * std
    P = smooth_load_prob(clean, noisy, std, k)[0]
    # redraw only expert e's noise: the others stay fixed
    n = 40000
    for e in range(4):
        z = noisy.repeat(n, 1)
        z[:, e] = clean[0, e] + torch.randn(n, dtype=torch.float64) * std
        rate = (z.topk(k, -1).indices == e).any(-1).double().mean()
        assert abs(rate.item() - P[e].item()) < 0.015


def test_latency_length_is_checked():
    with pytest.raises(ConfigError, match="latency"):
        layer(E=4, latency=[6.0, 4.0])
    with pytest.raises(ConfigError, match="latency"):
        layer(E=2, latency=[6.0, -1.0])
