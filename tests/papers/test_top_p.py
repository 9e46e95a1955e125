"""Dynamic top-p routing (Huang et al. 2024): fewest experts past the threshold, raw weights, strict
threshold, padding, both balance normalisations, losses."""

import math

import pytest
import torch

import moesaic
from moesaic.core.errors import ConfigError
from moesaic.moe.routing.top_p import top_p_select


def _layer(thr=0.4, E=6, **router):
    return moesaic.moe_layer(16, 32, E, 1, router={"kind": "top_p", "threshold": thr, **router}).double()


def test_property1_smallest_set_exceeding_threshold():
    torch.manual_seed(1)
    probs = torch.randn(200, 8, dtype=torch.float64).mul(2).softmax(-1)
    for thr in (0.1, 0.4, 0.75, 0.95):
        ids, w = top_p_select(probs, thr)
        for t in range(probs.shape[0]):
            sel = ids[t][ids[t] >= 0]
            mass = probs[t, sel].sum()
            assert mass > thr
            assert mass - probs[t, sel[-1]] <= thr  # dropping the last selected expert falls to <= thr
            assert torch.equal(w[t, : sel.numel()], probs[t, sel])  # raw weights, no renormalisation
            unsel = torch.ones(8, dtype=torch.bool)
            unsel[sel] = False
            if unsel.any():  # the selected experts are the most probable ones
                assert probs[t, sel].min() >= probs[t, unsel].max()


def test_property2_tiny_threshold_is_top1_without_renorm():
    probs = torch.randn(50, 5, dtype=torch.float64).softmax(-1)
    ids, w = top_p_select(probs, 1e-9)
    assert ids.shape[1] == 1
    assert torch.equal(ids[:, 0], probs.argmax(-1)) and torch.equal(w[:, 0], probs.max(-1).values)


def test_property3_k_monotone_in_threshold():
    probs = torch.randn(100, 8, dtype=torch.float64).softmax(-1)
    prev = None
    for thr in torch.linspace(0.01, 0.99, 25).tolist():
        k = (top_p_select(probs, thr)[0] >= 0).sum(-1)
        if prev is not None:
            assert (k >= prev).all()
        prev = k


def test_property4_layer_equals_brute_force(ref):
    layer = _layer(0.6)
    x = torch.randn(40, 16, dtype=torch.float64)
    y = layer(x)
    p = layer.router.logits(x).softmax(-1)
    ids, w = top_p_select(p, 0.6)
    w_TE = torch.zeros_like(p).scatter_add(1, ids.clamp_min(0), w * (ids >= 0))
    torch.testing.assert_close(y, ref.brute_force(layer, x, w_TE), atol=1e-10, rtol=0)
    k = layer.last_stats["assignments"] / 40
    assert 1.0 <= k <= 6.0


def test_strict_threshold_and_edge_cases():
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.7, 0.2, 0.1]], dtype=torch.float64)
    ids, _ = top_p_select(probs, 0.5)
    assert (ids[0] >= 0).sum() == 2  # p_max == thr exactly needs 2 experts (strict >)
    assert (ids[1] >= 0).sum() == 1
    # Rounding leaves sum(p) <= thr: every expert is taken, never more than E.
    ids, _ = top_p_select(torch.full((1, 4), 0.2499999, dtype=torch.float64), 0.9999999)
    assert (ids >= 0).sum() == 4
    ids, _ = top_p_select(torch.full((3, 6), 1 / 6, dtype=torch.float64), 0.9, max_k=2)
    assert ((ids >= 0).sum(-1) == 2).all()  # max_k cap
    with pytest.raises(ConfigError, match="threshold"):
        _layer(1.0)
    with pytest.raises(ConfigError, match="max_k"):
        _layer(0.5, max_k=9)


def test_losses_uniform_router_and_gradients():
    layer = _layer(0.4, E=4, aux_loss_coef=1.0, dynamic_loss_coef=1.0)
    torch.nn.init.zeros_(layer.router.weight)  # uniform p: balance 1, entropy log E
    x = torch.randn(32, 16, dtype=torch.float64)
    layer(x)
    assert layer.aux_losses["balance"].item() == pytest.approx(1.0)
    assert layer.aux_losses["dynamic"].item() == pytest.approx(math.log(4))
    # Minimising the entropy sharpens the router: fewer experts per token after a few steps.
    layer = _layer(0.4, E=8, aux_loss_coef=0.0, dynamic_loss_coef=1.0)
    x = torch.randn(64, 16, dtype=torch.float64)
    opt = torch.optim.SGD(layer.router.parameters(), lr=5.0)
    layer(x)
    k0 = layer.last_stats["assignments"]
    for _ in range(30):
        layer(x)
        opt.zero_grad()
        moesaic.collect_aux_losses(layer).backward()
        opt.step()
    layer(x)
    assert layer.last_stats["assignments"] < k0


def test_padding_excluded():
    layer = _layer(0.5, aux_loss_coef=1.0, dynamic_loss_coef=1.0)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    y1 = layer(x[:, :4])
    aux1 = {k: v.clone() for k, v in layer.aux_losses.items()}
    mask[:, 4:] = False
    y2 = layer(x, mask=mask)
    torch.testing.assert_close(y2[:, :4], y1, atol=1e-12, rtol=0)
    assert (y2[:, 4:] == 0).all()
    for k in aux1:
        torch.testing.assert_close(layer.aux_losses[k], aux1[k], atol=1e-12, rtol=0)


def test_balance_normalisation_both_readings():
    """The two readings of the paper: f over selections (uniform = 1 for any k_t, the default) vs over tokens
    (uniform = mean k_t)."""
    x = torch.randn(40, 16, dtype=torch.float64)
    vals = {}
    for norm in ("selections", "tokens"):
        layer = _layer(0.6, E=4, aux_loss_coef=1.0, dynamic_loss_coef=0.0, balance_normalization=norm)
        torch.nn.init.zeros_(layer.router.weight)  # uniform p: every token takes 3 of 4 experts (0.75 > 0.6)
        layer(x)
        vals[norm] = layer.aux_losses["balance"].item()
    assert vals["selections"] == pytest.approx(1.0)
    assert vals["tokens"] == pytest.approx(3.0)
