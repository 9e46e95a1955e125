"""MoE++ zero-computation experts, gating residuals, gating modes, heterogeneous balance (Jin et al. 2024)."""

import math

import pytest
import torch
from torch import nn

import moesaic
from moesaic.core.errors import ConfigError, MoesaicError
from moesaic.core.types import DispatchPlan
from moesaic.moe.routing import losses
from moesaic.moe.routing.moepp import HeteroBalance, hetero_capacity, link_gating_residuals

D, F, E = 16, 32, 8  # 4 FFN + 2 constant + copy + zero


def layer(k=2, router=None, experts=None, **kw):
    return moesaic.moe_layer(D, F, E, top_k=k, router={"kind": "moepp", **(router or {})},
                             experts={"kind": "moepp", **(experts or {})}, **kw).double()


def expert_out(lyr, e, x):
    counts = torch.zeros(E, dtype=torch.long)
    counts[e] = x.shape[0]
    return lyr.experts(x, DispatchPlan.grouped(counts))


def test_expert_kinds_and_zero_copy_outputs():
    lyr = layer()
    assert lyr.experts.expert_kinds() == ["ffn"] * 4 + ["constant"] * 2 + ["copy", "zero"]
    x = torch.randn(7, D, dtype=torch.float64)
    assert torch.equal(expert_out(lyr, E - 1, x), torch.zeros_like(x))
    assert torch.equal(expert_out(lyr, E - 2, x), x)


@pytest.mark.parametrize("c", [0, 1])
def test_constant_expert_is_convex_mix_of_token_and_its_vector(c):
    lyr = layer()
    x = torch.randn(9, D, dtype=torch.float64)
    y = expert_out(lyr, 4 + c, x)
    v = lyr.experts.v_const_CD[c].detach()
    # y - v = a1 (x - v) with a1 in [0, 1], per token
    a1 = ((y - v) * (x - v)).sum(-1) / (x - v).square().sum(-1)
    assert torch.allclose(y, a1[:, None] * x + (1 - a1[:, None]) * v, atol=1e-12)
    assert bool(((a1 >= 0) & (a1 <= 1)).all())
    a = torch.softmax(x @ lyr.experts.w_const_C2D[c].detach().t(), -1)
    assert torch.allclose(a1, a[:, 0], atol=1e-12)


def test_layer_matches_brute_force_over_all_expert_kinds():
    lyr = layer(router={"normalization": "renorm"})
    x = torch.randn(40, D, dtype=torch.float64)
    w_TE = lyr.router(x).dense()
    ref = sum(w_TE[:, e:e + 1] * expert_out(lyr, e, x) for e in range(E))
    assert torch.allclose(lyr(x), ref, atol=1e-12)


def two_layers(**router):
    model = nn.Sequential(layer(router=router), layer(router=router))
    assert link_gating_residuals(model) == 1
    return model


def test_gating_residual_propagates_logits_and_zero_map_has_no_effect():
    model = two_layers()
    x = torch.randn(12, D, dtype=torch.float64)
    h = model[0](x)
    z1 = model[0].router.last_logits
    assert torch.allclose(z1, model[0].router.logits(x))  # the first layer has no residual
    model[1](h)
    z2 = model[1].router.last_logits
    assert torch.allclose(z2 - model[1].router.logits(h), z1 @ model[1].router.gate_map.t(), atol=1e-12)
    with torch.no_grad():
        model[1].router.gate_map.zero_()
    model[0](x)
    d_res = model[1].router(h)
    plain = layer(router={"gating_residual": False})
    plain.router.weight.data.copy_(model[1].router.weight.data)
    d_plain = plain.router(h)
    assert torch.equal(d_res.expert_idx_N, d_plain.expert_idx_N)
    assert torch.allclose(d_res.weight_N, d_plain.weight_N, atol=1e-15)


def test_gating_residual_from_context_and_errors():
    lyr = layer()
    x = torch.randn(5, D, dtype=torch.float64)
    z_prev = torch.randn(5, E, dtype=torch.float64)
    lyr(x, gate_residual=z_prev)
    assert torch.allclose(lyr.router.last_logits - lyr.router.logits(x), z_prev @ lyr.router.gate_map.t())
    with pytest.raises(MoesaicError, match="gating residual has shape"):
        lyr(x, gate_residual=torch.randn(4, E, dtype=torch.float64))
    model = two_layers()
    with pytest.raises(MoesaicError, match="has not run"):
        model[1](x)


def test_gating_residual_with_padding_uses_valid_rows():
    model = two_layers()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y = model[1](model[0](x, mask=mask), mask=mask)
    assert torch.equal(y[~mask], torch.zeros(2, D, dtype=torch.float64))
    y_valid = model[1](model[0](x[mask].unsqueeze(0)))
    assert torch.allclose(y[mask], y_valid[0], atol=1e-12)


def test_paper_gating_variants_a_b_and_mixtral_c():
    x = torch.randn(20, D, dtype=torch.float64)
    lyr = layer()
    p = lyr.router.logits(x).softmax(-1)
    top = p.topk(2)
    ref_a = torch.zeros_like(p).scatter(1, top.indices, top.values)
    assert torch.allclose(lyr.router(x).dense(), ref_a)
    for name in ("renorm", "mixtral"):
        other = layer(router={"normalization": "renorm"} if name == "renorm" else {"gating": "mixtral"})
        other.router.load_state_dict(lyr.router.state_dict())
        assert torch.allclose(other.router(x).dense(), ref_a / ref_a.sum(-1, keepdim=True), atol=1e-12)


def force_ffn0_and_zero(lyr):
    """Router weights that make experts 0 and E-1 the top-2 of every token with x[:, 0] > 0."""
    with torch.no_grad():
        lyr.router.weight.zero_()
        lyr.router.weight[0, 0] = 5.0
        lyr.router.weight[E - 1, 0] = 4.0


def test_release_compat_ffn_plus_zero_outputs_ffn_of_2x():
    lyr = layer(router={"gating": "release", "gating_residual": False}, experts={"input_scale": 2.0})
    paper = layer(router={"gating_residual": False})  # input_scale 1: its FFN_0 is the reference
    force_ffn0_and_zero(lyr)
    force_ffn0_and_zero(paper)
    paper.experts.load_state_dict(lyr.experts.state_dict())
    x = torch.randn(16, D, dtype=torch.float64)
    x[:, 0] = x[:, 0].abs() + 1
    x_copy = x.clone()
    y = lyr(x)
    assert torch.equal(x, x_copy)  # the caller's tensor is never scaled in place
    assert torch.allclose(y, expert_out(paper, 0, 2 * x), atol=1e-12)
    w = lyr.router(x).dense()
    assert torch.equal(w[:, 0], torch.ones(16, dtype=torch.float64)) and torch.equal(w[:, E - 1], torch.zeros(16))
    p0 = paper.router.logits(x).softmax(-1)[:, :1]
    assert torch.allclose(paper(x), p0 * expert_out(paper, 0, x), atol=1e-12)  # paper form: g * FFN(x)


def test_release_top1_zero_expert_gives_zero_not_nan():
    lyr = layer(k=1, router={"gating": "release", "gating_residual": False})
    with torch.no_grad():
        lyr.router.weight.zero_()
        lyr.router.weight[E - 1, 0] = 5.0
    x = torch.randn(4, D, dtype=torch.float64)
    x[:, 0] = 1.0
    assert torch.equal(lyr(x), torch.zeros_like(x))


def test_hetero_balance_golden_and_tau_one_is_switch_over_e():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64)
    counts = torch.tensor([1, 1, 0])  # top-1: token 0 -> 0, token 1 -> 1
    eta = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)
    # f = (0.5, 0.5, 0), P = (0.3, 0.45, 0.25): 0.5*0.3 + 0.5*0.45 + 0.5*0*0.25
    assert HeteroBalance(probs, counts, eta).value().item() == pytest.approx(0.375)
    ones = torch.ones(3, dtype=torch.float64)
    switch = losses.SwitchBalance(probs, counts).value().item()
    assert HeteroBalance(probs, counts, ones).value().item() == pytest.approx(switch / 3)
    for k in (1, 2):
        lyr = layer(k=k, router={"tau": 1.0, "gating_residual": False})
        x = torch.randn(32, D, dtype=torch.float64)
        d = lyr.router(x)
        sw = losses.SwitchBalance(d.probs_TE, d.tokens_per_expert()).value()
        assert d.aux_losses["balance"].item() == pytest.approx(k / E * sw.item(), rel=1e-12)


def test_smaller_tau_lowers_the_penalty_on_zero_computation_experts():
    x = torch.randn(32, D, dtype=torch.float64)
    vals = []
    for tau in (1.0, 0.75, 0.1):
        lyr = layer(router={"tau": tau, "gating_residual": False})
        torch.manual_seed(0)
        lyr.router.reset_parameters()
        vals.append(lyr.router(x).aux_losses["balance"].item())
    assert vals[0] > vals[1] > vals[2]
    # gradient on a ZC expert's router row scales with tau; on an FFN row it does not
    grads = []
    for tau in (1.0, 0.5):
        lyr = layer(router={"tau": tau, "gating_residual": False})
        torch.manual_seed(0)
        lyr.router.reset_parameters()
        lyr.router(x).aux_losses["balance"].backward()
        grads.append(lyr.router.weight.grad.clone())
    assert not torch.allclose(grads[0][E - 1], grads[1][E - 1])


def test_heterogeneous_capacity():
    c_ffn, c_zc = hetero_capacity(64, 2, 4, 4, 0.75, 1.1)
    assert (c_ffn, c_zc) == (math.ceil(1.1 * 2 * 64 * 0.75 / 7), math.ceil(1.1 * 2 * 64 / 7))
    lyr = layer(router={"capacity_factor": 1.1, "gating_residual": False})
    with torch.no_grad():
        lyr.router.weight.zero_()
        lyr.router.weight[0, 0] = 5.0  # crowd expert 0
    x = torch.randn(64, D, dtype=torch.float64)
    x[:, 0] = 1.0
    d = lyr.router(x)
    load = d.tokens_per_expert()
    assert int(load[:4].max()) <= c_ffn and int(load[4:].max()) <= c_zc and d.dropped > 0
    assert d.aux_losses["balance"] > 0
    lyr.eval()
    assert lyr.router(x).dropped == 0  # capacity is a training-time rule


def test_two_layer_gate_and_logits_norm():
    lyr = layer(router={"gate_layers": 2, "logits_norm_std": 1.0, "gating_residual": False})
    assert lyr.router.w_hidden.shape == (8 * E, D) and lyr.router.weight.shape == (E, 8 * E)
    x = torch.randn(6, D, dtype=torch.float64)
    z = torch.tanh(x @ lyr.router.w_hidden.t()) @ lyr.router.weight.t()
    d = lyr.router(x)
    assert torch.allclose(d.logits_TE, z)
    assert torch.allclose(d.probs_TE, (z / z.std(-1, keepdim=True)).softmax(-1))


def test_config_rules():
    with pytest.raises(ConfigError, match="zero_computation_experts"):
        layer(router={"zero_computation_experts": 3})
    with pytest.raises(ConfigError, match="num_experts"):
        moesaic.moe_layer(D, F, 4, top_k=2, router={"kind": "moepp"}, experts={"kind": "moepp"})
    with pytest.raises(ConfigError, match="num_zero"):
        layer(router={"gating": "release", "zero_computation_experts": 3}, experts={"num_zero": 0})
    ok = layer(router={"zero_computation_experts": 1}, experts={"num_constant": 0, "num_copy": 0})
    assert ok.experts.num_ffn == 7


def test_trains_and_sends_some_tokens_to_zero_computation_experts():
    torch.manual_seed(0)
    lyr = layer(router={"tau": 0.25, "gating_residual": False})
    opt = torch.optim.Adam(lyr.parameters(), lr=1e-2)
    x = torch.randn(32, D, dtype=torch.float64)
    target = torch.tanh(x @ torch.randn(D, D, dtype=torch.float64))
    first = None
    for _ in range(12):
        loss = (lyr(x) - target).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        (loss + moesaic.collect_aux_losses(lyr)).backward()
        opt.step()
    assert loss.item() < first
    assert int(lyr.last_stats["tokens_per_expert"][4:].sum()) > 0


def test_decoder_lm_links_gating_residuals_at_build():
    from moesaic.core.config import parse, validate_tree
    from moesaic.models.base import MODELS

    cfg = validate_tree(parse(MODELS.get("decoder_lm").Config, {
        "vocab_size": 32, "d_model": D, "num_layers": 3, "d_ff": F, "max_seq_len": 16,
        "attention": {"kind": "mha", "num_heads": 2},
        "moe": {"d_ff": F, "num_experts": E, "top_k": 2, "router": {"kind": "moepp"}, "experts": {"kind": "moepp"}},
        "moe_every": 1}, "model"), "model")
    model = cfg.build().double()
    routers = [m.router for m in moesaic.moe_layers(model)]
    assert len(routers) == 3 and routers[0]._prev == [] and routers[2]._prev == [routers[1]]
    ids = torch.randint(0, 32, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
    model(ids, attention_mask=mask)
    z1, z2 = routers[1].last_logits, routers[2].last_logits
    assert z1.shape == (10, E)  # valid tokens only
    own = z2 - z1 @ routers[2].gate_map.t()
    with torch.no_grad():
        routers[2].gate_map.zero_()
    model(ids, attention_mask=mask)
    assert torch.allclose(routers[2].last_logits, own, atol=1e-10)
