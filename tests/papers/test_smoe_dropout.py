"""SMoE-Dropout (Chen et al. 2023): frozen router, variant C, k schedule, any k at inference."""

import pytest
import torch

import moesaic
from moesaic.core.errors import ConfigError
from moesaic.moe.routing.smoe_dropout import set_top_k

SCHED = {"kind": "linear_increase", "min_value": 1, "max_value": 4, "total_steps": 30, "integer": True}


def _layer(E=4, k=2, **router):
    return moesaic.moe_layer(16, 32, E, k, router={"kind": "smoe_dropout", **router})


def test_property1_router_bit_identical_after_optimizer_step():
    layer = _layer(k_schedule=SCHED)
    before = {n: p.detach().clone() for n, p in layer.router.named_parameters()}
    assert set(before) == {"weight", "bias"} and not any(p.requires_grad for p in layer.router.parameters())
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)  # all parameters, weight decay on
    experts_before = layer.experts.w_up_EHD.detach().clone()
    for step in range(1, 4):
        y = layer(torch.randn(2, 8, 16))
        opt.zero_grad()
        y.square().mean().backward()
        opt.step()
        moesaic.on_optimizer_step(layer, step)
    for n, p in layer.router.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not torch.equal(layer.experts.w_up_EHD, experts_before)  # the experts did train


def test_variant_c_weights_and_bias():
    layer = _layer(k=2).double()
    x = torch.randn(20, 16, dtype=torch.float64)
    d = layer.router(x)
    z = x @ layer.router.weight.T + layer.router.bias  # Linear with bias
    top, ids = z.topk(2, dim=-1)
    ids_d, w_d = d.to_topk()
    assert torch.equal(ids_d, ids)
    torch.testing.assert_close(w_d, top.softmax(-1))  # softmax over the k selected logits


def test_property3_k_equals_E_is_dense_softmax_mixture(ref):
    layer = _layer(E=4, k=4).double()
    x = torch.randn(30, 16, dtype=torch.float64)
    z = x @ layer.router.weight.T + layer.router.bias
    torch.testing.assert_close(layer(x), ref.brute_force(layer, x, z.softmax(-1)), atol=1e-10, rtol=0)


def test_schedule_drives_k_and_resumes_from_state_dict():
    layer = _layer(k_schedule=SCHED)
    x = torch.randn(12, 16)
    ks = []
    for step in (0, 5, 15, 25, 30, 100):
        moesaic.on_optimizer_step(layer, step)
        layer(x)
        ks.append(layer.last_stats["assignments"] // 12)
    assert ks == [1, 1, 3, 3, 4, 4]  # round(3 s / 30) + 1 (half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2), clamped
    sd = layer.state_dict()
    fresh = _layer(k_schedule=SCHED)
    fresh.load_state_dict(sd)
    assert fresh.router.current_k == 4 and fresh.router.k_schedule.current_step == 100


def test_property4_any_k_at_inference_changes_no_parameter(ref):
    layer = _layer(E=4, k=1, k_schedule=SCHED).double().eval()
    params = {n: p.detach().clone() for n, p in layer.named_parameters()}
    x = torch.randn(10, 16, dtype=torch.float64)
    z = x @ layer.router.weight.T + layer.router.bias
    for k in (1, 2, 3, 4):
        assert set_top_k(layer, k) == 1
        y = layer(x)
        top, ids = z.topk(k, dim=-1)
        w_TE = torch.zeros_like(z).scatter(1, ids, top.softmax(-1))
        torch.testing.assert_close(y, ref.brute_force(layer, x, w_TE), atol=1e-10, rtol=0)
        assert layer.last_stats["assignments"] == 10 * k
    for n, p in layer.named_parameters():
        assert torch.equal(p, params[n])
    set_top_k(layer, None)
    assert layer.router.current_k == 1  # back to the schedule (step 0)
    with pytest.raises(ConfigError, match="top_k"):
        set_top_k(layer, 5)


def test_schedule_outside_experts_is_a_config_error():
    with pytest.raises(ConfigError, match="k_schedule"):
        _layer(E=4, k_schedule={**SCHED, "max_value": 8})
