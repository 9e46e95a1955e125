"""Experts Weights Averaging (Huang et al. 2023, arXiv 2308.06093; our share_rate convention in docs/papers.md):
random uniform partition routing, averaging, merge."""

import pytest
import torch

import moesaic
from moesaic.core.errors import ConfigError, ConversionError
from moesaic.core.types import DispatchPlan
from moesaic.models.regression import RegressionModel, RegressionModelConfig
from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.experts.ewa import ewa_average_
from moesaic.transforms.ewa_merge import MergedFFN, merge_experts_, merge_layer

D, F, E = 16, 32, 4


def ewa_layer(share_rate=0.3, gated=True, **kw):
    kw.setdefault("router", {"kind": "random_partition"})
    return moesaic.moe_layer(D, F, E, top_k=1,
                             experts={"kind": "ewa", "share_rate": share_rate, "gated": gated,
                                      "activation": "silu" if gated else "gelu"}, **kw)


@pytest.mark.parametrize("T", [1, 3, 4, 17, 64])
def test_rup_assigns_each_token_once_with_balanced_loads(T):
    layer = ewa_layer()
    d = layer.router(torch.randn(T, D))
    assert torch.equal(d.experts_per_token(), torch.ones(T, dtype=torch.long))
    load = d.tokens_per_expert()
    assert int(load.max() - load.min()) <= 1 and int(load.sum()) == T
    assert torch.equal(d.weight_N, torch.ones(T))


def test_rup_is_random_in_training_and_deterministic_in_eval():
    layer = ewa_layer()
    x = torch.randn(64, D)
    a, b = layer.router(x).expert_idx_N, layer.router(x).expert_idx_N
    assert not torch.equal(a, b)  # two random partitions of 64 tokens (collision chance ~1e-35)
    layer.eval()
    c, d = layer.router(x), layer.router(x)
    assert torch.equal(c.expert_idx_N, d.expert_idx_N)


def test_rup_eval_average_mode_and_top_k_rule():
    layer = ewa_layer(router={"kind": "random_partition", "eval_mode": "average"}).eval()
    w = layer.router(torch.randn(5, D)).dense()
    assert torch.allclose(w, torch.full((5, E), 1 / E))
    with pytest.raises(ConfigError, match="top_k"):
        moesaic.moe_layer(D, F, E, top_k=2, router={"kind": "random_partition"})


def test_rup_layer_equals_brute_force():
    layer = ewa_layer().double()
    x = torch.randn(20, D, dtype=torch.float64)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    ids = layer.router(x).to_topk()[0][:, 0]
    one_hot = torch.eye(E, dtype=torch.long)
    ref = torch.stack([layer.experts(x[t:t + 1], DispatchPlan.grouped(one_hot[ids[t]]))[0] for t in range(20)])
    assert torch.allclose(y, ref, atol=1e-12)


def test_ewa_step_keeps_sum_and_matches_formula():
    w = torch.randn(E, 3, 5, dtype=torch.float64)
    before = w.clone()
    ewa_average_(w, 0.3)
    assert torch.allclose(w.sum(0), before.sum(0), atol=1e-12)
    for i in range(E):
        others = torch.cat([before[:i], before[i + 1:]]).mean(0)
        assert torch.allclose(w[i], 0.7 * before[i] + 0.3 * others, atol=1e-12)


def test_share_rate_zero_is_noop_and_full_share_gives_mean():
    layer = ewa_layer(share_rate=0.0)
    before = {n: p.detach().clone() for n, p in layer.experts.named_parameters()}
    moesaic.on_optimizer_step(layer, 1)
    assert all(torch.equal(p, before[n]) for n, p in layer.experts.named_parameters())
    layer.experts.average_((E - 1) / E)
    for n, p in layer.experts.named_parameters():
        assert torch.allclose(p, before[n].mean(0, keepdim=True).expand_as(p), atol=1e-6)


def test_on_optimizer_step_averages_with_configured_rate():
    layer = ewa_layer(share_rate=0.5)
    w0 = layer.experts.w_up_EHD.detach().clone()
    spread0 = (w0 - w0.mean(0)).norm()
    moesaic.on_optimizer_step(layer, 1)
    w1 = layer.experts.w_up_EHD.detach()
    # deviation from the mean shrinks by 1 - s*E/(E-1)
    assert torch.allclose((w1 - w1.mean(0)).norm(), spread0 * (1 - 0.5 * E / (E - 1)), rtol=1e-5)
    assert torch.allclose(w1.sum(0), w0.sum(0), atol=1e-5)


@pytest.mark.parametrize("gated", [True, False])
def test_merging_equal_experts_returns_that_ffn_exactly(gated):
    layer = ewa_layer(gated=gated).double()
    layer.experts.average_((E - 1) / E)  # all experts equal (up to rounding): make them bit-equal
    for n in layer.experts.stacked_names():
        p = getattr(layer.experts, n)
        p.data.copy_(p.data[:1].expand_as(p))
    ffn = merge_layer(layer)
    assert isinstance(ffn, DenseFFN)
    x = torch.randn(30, D, dtype=torch.float64)
    # The merged FFN holds exactly the experts' weights (torch.equal below), so it is the same function.
    # Its float64 outputs are equal up to rounding, not bit for bit: the layer runs each expert's rows as
    # one [n_e, D] x [D, 2F] GEMM (gate and up fused), the FFN all 30 rows as two [30, D] x [D, F] GEMMs,
    # and BLAS picks its kernel, hence the summation order, by GEMM shape (on MKL/AVX512 a row's result
    # changes with the number of rows in the call and with the output width). So the exact claim for two
    # different GEMM shapes is a few ulps: measured at most 3e-16 norm-wise over 60 draws; bound 8 eps.
    with torch.no_grad():
        y_ffn, y_moe = ffn(x), layer(x)
    eps = torch.finfo(torch.float64).eps
    assert float((y_ffn - y_moe).norm()) <= 8 * eps * float(y_moe.norm())
    F_ = layer.experts.d_ff
    w_up = layer.experts.w_up_EHD[0]
    if gated:
        assert torch.equal(ffn.gate_proj.weight, w_up[:F_]) and torch.equal(ffn.up_proj.weight, w_up[F_:])
    else:
        assert torch.equal(ffn.up_proj.weight, w_up)
    assert torch.equal(ffn.down_proj.weight, layer.experts.w_down_EDF[0])


def test_merge_equals_averaged_experts_in_a_model():
    model_cfg = moesaic.core.config.parse(RegressionModelConfig, {
        "d_in": 8, "d_model": D, "moe": {"d_ff": F, "num_experts": E, "top_k": 1,
                                         "router": {"kind": "random_partition"}, "experts": {"kind": "ewa"}}}, "model")
    model = RegressionModel(model_cfg).double()
    up = model.moe.experts.w_up_EHD.detach().mean(0)
    down = model.moe.experts.w_down_EDF.detach().mean(0)
    merged = merge_experts_(model)
    assert list(merged) == ["moe"] and isinstance(model.moe, MergedFFN)
    assert torch.equal(model.moe.gate_proj.weight, up[:F]) and torch.equal(model.moe.up_proj.weight, up[F:])
    assert torch.equal(model.moe.down_proj.weight, down)
    x = torch.randn(6, 8, dtype=torch.float64)
    h = model.inp(x)
    assert torch.allclose(model(x), model.out(h + model.moe(h)))
    mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    assert torch.equal(model.moe(h, mask=mask)[~mask], torch.zeros(2, D, dtype=torch.float64))


@pytest.mark.parametrize("combine", ["sum", "average"])
def test_merge_folds_shared_experts_exactly(combine):
    layer = ewa_layer(shared_experts={"num": 1, "d_ff": 8, "combine": combine}).double()
    for n in layer.experts.stacked_names():
        p = getattr(layer.experts, n)
        p.data.copy_(p.data[:1].expand_as(p))
    ffn = merge_layer(layer)
    x = torch.randn(10, D, dtype=torch.float64)
    assert torch.allclose(ffn(x), layer(x), atol=1e-12)
    with pytest.raises(ConversionError, match="sigmoid"):
        merge_layer(ewa_layer(shared_experts={"num": 1, "gate": "sigmoid"}))


def test_merge_rejects_non_ffn_experts_and_bare_layers():
    layer = ewa_layer()
    with pytest.raises(ConversionError, match="merge_layer"):
        merge_experts_(layer)
    assert merge_experts_(torch.nn.Sequential(layer), filter_fn=lambda n, m: False) == {}


def test_ewa_training_drives_experts_together():
    torch.manual_seed(0)
    layer = ewa_layer(share_rate=0.3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    spread0 = (layer.experts.w_down_EDF - layer.experts.w_down_EDF.mean(0)).norm().item()
    for step in range(1, 11):
        x = torch.randn(32, D)
        loss = (layer(x) - x.flip(-1)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        moesaic.on_optimizer_step(layer, step)
    spread = (layer.experts.w_down_EDF - layer.experts.w_down_EDF.mean(0)).norm().item()
    assert spread < 0.1 * spread0
