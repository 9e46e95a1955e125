"""Contract tests for EVERY registered router (docs/design.md, Tests of the foundation): padding, empty
batches, non-finite input, causality, config round trips.

Parametrised over the registry, so a router added later in its own file is covered without editing this
file. Each router is built from its default Config (plus a small z-loss so the z-loss is checked too) inside
a tiny MoE layer (D=16, F=32, E=4, k = the router's ``required_top_k`` or 2). Routers that need routing
context (token ids, task id) provide it through ``Router.example_ctx(T)``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moesaic.core.config import dump_yaml, loads_yaml, parse, validate_tree
from moesaic.core.errors import CausalityError, ConfigError, NonFiniteInputError
from moesaic.moe.dispatch.base import DISPATCHERS
from moesaic.moe.layer import MoEConfig, MoELayer
from moesaic.moe.routing.base import ROUTERS

D, F, E, T, PAD = 16, 32, 4, 12, 100
ROUTER_NAMES = ROUTERS.names()


def make_cfg(name: str, **router_changes) -> MoEConfig:
    cls = ROUTERS.get(name)
    rcfg = dataclasses.replace(cls.Config(), z_loss_coef=1e-3, **router_changes)
    candidates = [cls.required_top_k] if cls.required_top_k else [2, 1]  # k=1-only routers may not say so
    extra = {}
    if cls.requires_dispatcher:  # e.g. Soft MoE's slot dispatcher
        extra["dispatcher"] = DISPATCHERS.get(cls.requires_dispatcher).Config()
    for i, k in enumerate(candidates):
        try:
            return validate_tree(MoEConfig(d_ff=F, num_experts=E, top_k=k, router=rcfg, **extra), "moe")
        except ConfigError:
            if i == len(candidates) - 1:
                raise


def make_layer(name: str, dtype=torch.float64, **router_changes) -> MoELayer:
    layer = MoELayer(make_cfg(name, **router_changes), D).to(dtype)
    with torch.no_grad():  # some routers start at zero (noisy top-k); the contract wants real scores
        for p in layer.router.parameters():
            p.normal_(0.0, 0.5)
    return layer


def ctx_for(name: str, num_tokens: int) -> dict:
    return ROUTERS.get(name).example_ctx(num_tokens)


def slice_ctx(ctx: dict, total: int, n: int) -> dict:
    return {k: (v[:n] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == total else v)
            for k, v in ctx.items()}


def run(layer, x, mask=None, ctx=None, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    y = layer(x, mask=mask, **(ctx or {}))
    return y, {n: v.detach().clone() for n, v in layer.aux_losses.items()}


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_documented_and_config_round_trips(name):
    assert ROUTERS.describe(name), f"router {name!r} needs a one-line docstring for `moesaic list`"
    cfg = make_cfg(name)
    again = validate_tree(parse(MoEConfig, loads_yaml(dump_yaml(cfg)), "moe"), "moe")
    assert again == cfg


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_decision_invariants(name, train):
    layer = make_layer(name).train(train)
    x = torch.randn(T, D, dtype=torch.float64)
    d = layer.router(x, **ctx_for(name, T))
    assert d.num_tokens == T and d.num_experts == E
    n = d.num_assignments
    assert d.token_idx_N.shape == d.expert_idx_N.shape == d.weight_N.shape == (n,)
    assert d.expert_idx_N.dtype == torch.long and d.token_idx_N.dtype == torch.long
    if n:
        assert 0 <= int(d.expert_idx_N.min()) and int(d.expert_idx_N.max()) < E
        assert 0 <= int(d.token_idx_N.min()) and int(d.token_idx_N.max()) < T
    assert torch.isfinite(d.weight_N).all() and (d.weight_N >= 0).all()
    assert int(d.tokens_per_expert().sum()) == n
    assert int(d.experts_per_token().sum()) == n
    pairs = d.token_idx_N * E + d.expert_idx_N
    assert pairs.unique().numel() == n, "a token is sent twice to the same expert"
    for name_, v in d.aux_losses.items():
        assert v.dim() == 0 and torch.isfinite(v), name_
    y = layer(x, **ctx_for(name, T))
    assert y.shape == x.shape and torch.isfinite(y).all()
    if ROUTERS.get(name).requires_dispatcher is None:  # slot dispatchers (Soft MoE) count slots, not assignments
        assert int(layer.last_stats["tokens_per_expert"].sum()) == layer.last_stats["assignments"]


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_eval_is_deterministic(name):
    layer = make_layer(name).eval()
    x = torch.randn(T, D, dtype=torch.float64)
    ctx = ctx_for(name, T)
    # Documented stochastic inference (THOR, Zuo et al. 2022): reproducible under a fixed seed.
    seed = 0 if ROUTERS.get(name).stochastic_eval else None
    outs = [run(layer, x, ctx=ctx, seed=seed) for _ in range(3)]
    stats = []
    for _ in range(3):
        if seed is not None:
            torch.manual_seed(seed)
        stats.append(layer.router(x, **ctx).tokens_per_expert())
    for (y, aux), s in zip(outs[1:], stats[1:]):
        assert torch.equal(y, outs[0][0]) and torch.equal(s, stats[0])
        assert aux.keys() == outs[0][1].keys() and all(torch.equal(aux[k], outs[0][1][k]) for k in aux)


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_gradient_reaches_router(name):
    layer = make_layer(name).train()
    x = torch.randn(T, D, dtype=torch.float64)
    y = layer(x, **ctx_for(name, T))
    loss = y.square().sum()
    if layer.aux_losses:
        loss = loss + sum(layer.aux_losses.values())
    loss.backward()
    params = dict(layer.router.named_parameters())
    for pname, p in params.items():
        if p.requires_grad:  # frozen routers (SMoE-Dropout) are exempt
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    if ROUTERS.get(name).has_weight and layer.router.weight.requires_grad:
        assert float(layer.router.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_padding_invariance(name, train):
    """100 masked padding tokens change neither real outputs nor aux losses nor the router grad;
    unmasked, the same padding changes the aux losses."""
    layer = make_layer(name).train(train)
    x = torch.randn(T, D, dtype=torch.float64)
    pad = 3.0 * torch.randn(PAD, D, dtype=torch.float64)
    x_pad = torch.cat([x, pad])
    mask = torch.cat([torch.ones(T, dtype=torch.bool), torch.zeros(PAD, dtype=torch.bool)])
    ctx_pad = ctx_for(name, T + PAD)
    ctx = slice_ctx(ctx_pad, T + PAD, T)

    def loss_and_grad(inp, m, c):
        layer.zero_grad()
        y, aux = run(layer, inp, m, c, seed=1234)
        total = y[:T].square().sum() + sum(layer.aux_losses.values(), torch.zeros((), dtype=y.dtype))
        total.backward()
        trained = ROUTERS.get(name).has_weight and layer.router.weight.requires_grad
        g = layer.router.weight.grad.clone() if trained else None
        return y.detach(), aux, g

    y_ref, aux_ref, g_ref = loss_and_grad(x, None, ctx)
    y_pad, aux_pad, g_pad = loss_and_grad(x_pad, mask, ctx_pad)
    torch.testing.assert_close(y_pad[:T], y_ref, rtol=0, atol=1e-12)
    assert torch.equal(y_pad[T:], torch.zeros_like(y_pad[T:])), "padding must get MoE output 0"
    assert aux_pad.keys() == aux_ref.keys()
    for k in aux_ref:
        torch.testing.assert_close(aux_pad[k], aux_ref[k], rtol=0, atol=1e-12, msg=f"aux {k}")
    if g_ref is not None:
        torch.testing.assert_close(g_pad, g_ref, rtol=0, atol=1e-12)
    # negative control: the same padding, unmasked, is routed and enters every statistic
    _, aux_unmasked, _ = loss_and_grad(x_pad, None, ctx_pad)
    if aux_ref:
        assert any(abs(float(aux_unmasked[k] - aux_ref[k])) > 1e-9 for k in aux_ref)


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_all_padding_batch(name):
    """Zero valid tokens: forward and backward run, output 0, losses finite, every param has a grad."""
    layer = make_layer(name).train()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    y = layer(x, mask=mask, **ctx_for(name, 10))
    assert torch.equal(y, torch.zeros_like(y))
    loss = y.sum() + sum(layer.aux_losses.values(), torch.zeros((), dtype=y.dtype))
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in layer.experts.named_parameters():
        assert p.grad is not None, pname
    assert layer.last_stats["tokens"] == 0 and int(layer.last_stats["tokens_per_expert"].sum()) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_non_finite_input_names_the_layer(name, bad):
    layer = make_layer(name)
    layer.layer_name = "blocks.7.moe"
    x = torch.randn(T, D, dtype=torch.float64)
    x[3, 5] = bad
    with pytest.raises(NonFiniteInputError, match=r"blocks\.7\.moe"):
        layer(x, **ctx_for(name, T))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_non_finite_padding_is_ignored(name, bad):
    """Padding may hold anything: NaN or inf only in masked rows raises nothing and changes no real output,
    aux loss or parameter gradient (compared with zero padding); padding rows get output 0."""
    layer = make_layer(name).train()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    ctx = ctx_for(name, 12)
    results = []
    for fill in (0.0, bad):
        inp = x.clone()
        inp[0, 4:] = fill
        layer.zero_grad()
        torch.manual_seed(7)
        y = layer(inp, mask=mask, **ctx)
        aux = {k: v.detach() for k, v in layer.aux_losses.items()}
        (y[mask].square().sum() + sum(layer.aux_losses.values(), torch.zeros((), dtype=y.dtype))).backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        results.append((y.detach(), aux, grads))
    (y0, aux0, g0), (y1, aux1, g1) = results
    assert torch.equal(y1[~mask], torch.zeros_like(y1[~mask])), "padding must get MoE output 0"
    torch.testing.assert_close(y1[mask], y0[mask], rtol=0, atol=1e-12)
    assert aux1.keys() == aux0.keys()
    for k in aux0:
        torch.testing.assert_close(aux1[k], aux0[k], rtol=0, atol=1e-12, msg=f"aux {k}")
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=1e-12, msg=n)


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_causal_contract(name):
    cls = ROUTERS.get(name)
    cfg = make_cfg(name)
    if cls.causal_ok:
        MoELayer(cfg, D, causal=True)
    else:
        with pytest.raises(CausalityError, match=name):
            MoELayer(cfg, D, causal=True)
