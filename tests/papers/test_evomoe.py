"""EvoMoE (Nie et al. 2021): DTS Gumbel gate, temperature schedule, aux loss, expert diversify (both readings
of the diversification)."""

import math

import pytest
import torch

import moesaic
from moesaic.core.errors import ConversionError
from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.routing.dts import GateUsageBalance
from moesaic.transforms.evomoe_spawn import spawn_experts_

D, F, E = 16, 32, 4


def dts_layer(E=E, temperature=None, **router):
    r = {"kind": "dts", **router}
    if temperature is not None:
        r["temperature"] = temperature
    return moesaic.moe_layer(D, F, E, top_k=1, router=r).double()


def const_temp(t):
    return {"kind": "constant", "constant": t}


def test_large_tau_selects_every_expert_and_small_tau_about_one():
    x = torch.randn(64, D, dtype=torch.float64)
    hot = dts_layer(E=16, temperature=const_temp(1e3))
    assert torch.equal(hot.router(x).experts_per_token(), torch.full((64,), 16))
    cold = dts_layer(E=16, temperature=const_temp(0.01))
    assert cold.router(x).experts_per_token().double().mean().item() < 1.1


def test_mean_selected_experts_decreases_with_tau():
    x = torch.randn(256, D, dtype=torch.float64)
    lyr = dts_layer(E=8)  # exp_decay 2.0 -> 0.3 over 1000 steps
    means = []
    for step in (0, 300, 600, 1000):
        moesaic.on_optimizer_step(lyr, step)
        torch.manual_seed(0)
        means.append(lyr.router(x).experts_per_token().double().mean().item())
    assert all(a > b for a, b in zip(means, means[1:])), means


def test_temperature_schedule_values_and_state():
    lyr = dts_layer(temperature={"kind": "exp_decay", "max_value": 2.0, "min_value": 0.3, "decay_steps": 100})
    assert lyr.router.tau == pytest.approx(2.0)
    taus = []
    for step in (1, 10, 50, 100, 150):
        moesaic.on_optimizer_step(lyr, step)
        taus.append(lyr.router.tau)
    expect = [max(2.0 * math.exp(s * math.log(0.3 / 2.0) / 100), 0.3) for s in (1, 10, 50, 100, 150)]
    assert taus == pytest.approx(expect) and taus[-2] == pytest.approx(0.3) and taus[-1] == pytest.approx(0.3)
    assert all(a >= b for a, b in zip(taus, taus[1:]))
    again = dts_layer(temperature={"kind": "exp_decay", "max_value": 2.0, "min_value": 0.3, "decay_steps": 100})
    again.load_state_dict(lyr.state_dict())
    assert again.router.tau == pytest.approx(0.3)
    lin = dts_layer(temperature={"kind": "linear_decrease", "max_value": 2.0, "min_value": 0.5, "total_steps": 10})
    moesaic.on_optimizer_step(lin, 4)
    assert lin.router.tau == pytest.approx(2.0 - 4 * 1.5 / 10)


def test_hard_phase_selects_exactly_one_expert_from_the_switch_step():
    lyr = dts_layer(hard_from_step=5, temperature=const_temp(2.0))
    x = torch.randn(32, D, dtype=torch.float64)
    moesaic.on_optimizer_step(lyr, 4)
    assert lyr.router(x).experts_per_token().max() > 1
    moesaic.on_optimizer_step(lyr, 5)
    d = lyr.router(x)
    assert torch.equal(d.experts_per_token(), torch.ones(32, dtype=torch.long))
    code_default = dts_layer(hard_from_step=-1)  # the released default: hard from step 0
    assert torch.equal(code_default.router(x).experts_per_token(), torch.ones(32, dtype=torch.long))


def test_soft_weights_are_thresholded_gumbel_softmax_without_renorm():
    lyr = dts_layer(temperature=const_temp(0.5), threshold=0.05)
    x = torch.randn(20, D, dtype=torch.float64)
    torch.manual_seed(7)
    d = lyr.router(x)
    torch.manual_seed(7)
    z = lyr.router.logits(x)
    u = torch.rand_like(z).clamp(torch.finfo(z.dtype).tiny, 1.0)
    g = ((z - torch.log(-torch.log(u))) / 0.5).softmax(-1)
    assert torch.allclose(d.dense(), g * (g > 0.05), atol=1e-12)
    soft = dts_layer(temperature=const_temp(0.5), threshold=0.05, use_gumbel_gates=False)
    soft.router.weight.data.copy_(lyr.router.weight.data)
    torch.manual_seed(7)
    assert torch.allclose(soft.router(x).dense(), z.softmax(-1) * (g > 0.05), atol=1e-12)


def test_aux_loss_golden_values():
    # uniform top-1 with weight 1: me = ce = 1/E -> E^2 * mean(1/E^2) = 1
    sel = torch.eye(E, dtype=torch.bool).repeat(3, 1)
    assert GateUsageBalance(sel.double(), sel).value().item() == pytest.approx(1.0)
    dense = torch.full((8, E), 1.0 / E, dtype=torch.float64)
    assert GateUsageBalance(dense, torch.ones(8, E, dtype=torch.bool)).value().item() == pytest.approx(E)
    w = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    # me = (0.35, 0.65, 0, 0), ce = (0.5, 1, 0, 0): E * (0.175 + 0.65) = 3.3
    assert GateUsageBalance(w, w > 0).value().item() == pytest.approx(3.3)


def test_eval_is_deterministic_top1_on_logits_without_drops():
    lyr = dts_layer(temperature=const_temp(5.0)).eval()
    x = torch.randn(30, D, dtype=torch.float64)
    p = lyr.router.logits(x).softmax(-1)
    ref = torch.zeros_like(p).scatter(1, p.argmax(-1, keepdim=True), p.max(-1, keepdim=True).values)
    assert torch.allclose(lyr.router(x).dense(), ref)
    dense_val = dts_layer(temperature=const_temp(1e3), dense_validate=True).eval()
    assert dense_val.router(x).experts_per_token().min() == E


def test_argmax_guard_for_many_experts():
    lyr = dts_layer(E=4, temperature=const_temp(1e3), threshold=0.9)  # no g exceeds 0.9
    assert torch.equal(lyr.router(torch.randn(10, D, dtype=torch.float64)).experts_per_token(),
                       torch.ones(10, dtype=torch.long))
    off = dts_layer(E=4, temperature=const_temp(1e3), threshold=0.9, keep_argmax=False)
    assert off.router(torch.randn(10, D, dtype=torch.float64)).num_assignments == 0


# ------------------------------------------------- expert diversify (mask or noise: the paper leaves it open)
def source_ffn():
    torch.manual_seed(1)
    return DenseFFN(D, F).double()


def glu_layer(**kw):
    return moesaic.moe_layer(D, F, E, top_k=2, **kw).double()


def test_diversify_mask_reading():
    ffn, lyr = source_ffn(), glu_layer()
    spawn_experts_(lyr, ffn, method="mask", keep_ratio=0.7, generator=torch.Generator().manual_seed(0))
    w = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight]).detach()
    up = lyr.experts.w_up_EHD.detach()
    kept = up != 0
    assert torch.equal(up, w * kept)  # every entry is either the source weight or 0
    assert abs(kept.double().mean().item() - 0.7) < 0.02  # 4 * 64 * 16 Bernoulli(0.7) draws
    assert all(not torch.equal(up[i], up[j]) for i in range(E) for j in range(i + 1, E))
    spawn_experts_(lyr, ffn, method="mask", keep_ratio=0.5, rescale=True)
    up = lyr.experts.w_up_EHD.detach()
    assert torch.equal(up[up != 0], (w.expand_as(up) / 0.5)[up != 0])


def test_diversify_noise_reading():
    ffn, lyr = source_ffn(), glu_layer()
    spawn_experts_(lyr, ffn, method="noise", noise_std=0.05, generator=torch.Generator().manual_seed(0))
    w = ffn.down_proj.weight.detach()
    diff = lyr.experts.w_down_EDF.detach() - w
    assert abs(diff.std().item() / (0.05 * w.std().item()) - 1) < 0.05
    assert abs(diff.mean().item()) < 0.05 * w.std().item() * 0.1
    assert all(not torch.equal(diff[i], diff[j]) for i in range(E) for j in range(i + 1, E))


def test_copy_reading_reproduces_the_dense_ffn():
    ffn, lyr = source_ffn(), glu_layer()  # renormalised top-2 weights sum to 1
    spawn_experts_(lyr, ffn, method="copy")
    x = torch.randn(12, D, dtype=torch.float64)
    assert torch.allclose(lyr(x), ffn(x), atol=1e-12)
    spawn_experts_(lyr, None, method="copy", source_expert=2)  # from one of the layer's own experts
    assert torch.allclose(lyr(x), ffn(x), atol=1e-12)


def test_diversify_errors():
    lyr = glu_layer()
    with pytest.raises(ConversionError, match="does not match"):
        spawn_experts_(lyr, DenseFFN(D, 2 * F).double())
    with pytest.raises(ConversionError, match="keep_ratio"):
        spawn_experts_(lyr, keep_ratio=0.0)
    with pytest.raises(ConversionError, match="method"):
        spawn_experts_(lyr, method="dropout")


# ------------------------------------------------------------- config-driven phases (dense -> diversify -> DTS)
def phased_layer(S=3, method="mask"):
    return moesaic.moe_layer(D, F, E, top_k=1, router={"kind": "dts", "dense_until_step": S},
                             experts={"kind": "evomoe", "diversify_step": S, "method": method,
                                      "keep_ratio": 0.8}).double()


def test_phases_dense_then_diversified_then_dts():
    lyr = phased_layer()
    x = torch.randn(16, D, dtype=torch.float64)
    opt = torch.optim.SGD(lyr.parameters(), lr=0.1)
    for step in (1, 2):
        d = lyr.router(x)
        assert torch.equal(d.expert_idx_N, torch.zeros(16, dtype=torch.long))
        assert torch.equal(d.weight_N, torch.ones(16, dtype=torch.float64))
        opt.zero_grad()
        lyr(x).square().mean().backward()
        assert lyr.experts.w_up_EHD.grad[1:].abs().sum() == 0  # only expert 0 trains in phase 1
        opt.step()
        moesaic.on_optimizer_step(lyr, step)
    w0 = lyr.experts.w_up_EHD[0].detach().clone()
    moesaic.on_optimizer_step(lyr, 3)
    up = lyr.experts.w_up_EHD.detach()
    assert torch.equal(up, w0 * (up != 0))  # every expert is a masked copy of the trained expert 0
    assert all(not torch.equal(up[i], up[j]) for i in range(E) for j in range(i + 1, E))
    assert lyr.router(x).experts_per_token().max() > 1  # the DTS gate has taken over (tau = 2.0: dense)
    twin = phased_layer()
    twin.experts.w_up_EHD.data[0].copy_(w0)
    twin.experts.diversify()
    assert torch.equal(twin.experts.w_up_EHD, lyr.experts.w_up_EHD)  # seeded: reproducible


def test_phase_steps_must_agree():
    with pytest.raises(Exception, match="dense_until_step"):
        moesaic.moe_layer(D, F, E, top_k=1, router={"kind": "dts", "dense_until_step": 5},
                          experts={"kind": "evomoe", "diversify_step": 3})
