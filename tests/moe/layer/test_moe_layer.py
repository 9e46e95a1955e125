"""The MoE layer (docs/design.md, The layer): dense equivalence, aux coefficients, gradients of
unused experts, shared experts, aux-loss collection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moesaic
from moesaic.moe.dense_ffn import DenseFFN

D, F = 16, 32


def copy_into_dense(layer, gated: bool, act: str, e: int = 0) -> DenseFFN:
    ffn = DenseFFN(D, F, act, gated).double()
    w_up, w_down = layer.experts.w_up_EHD[e], layer.experts.w_down_EDF[e]
    with torch.no_grad():
        if gated:
            ffn.gate_proj.weight.copy_(w_up[:F])
            ffn.up_proj.weight.copy_(w_up[F:])
        else:
            ffn.up_proj.weight.copy_(w_up)
        ffn.down_proj.weight.copy_(w_down)
    return ffn


@pytest.mark.parametrize("kind,act", [("glu", "silu"), ("mlp", "gelu")])
def test_one_expert_top1_equals_the_dense_ffn(kind, act):
    """E=1, k=1 is the dense FFN: output and every gradient within 1e-12 in float64."""
    layer = moesaic.moe_layer(D, F, 1, 1, router={"normalization": "none"},
                              experts={"kind": kind, "activation": act}).double()
    gated = kind == "glu"
    ffn = copy_into_dense(layer, gated, act)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = layer(xa), ffn(xb)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-12)
    g_out = torch.randn_like(ya)
    (ya * g_out).sum().backward()
    (yb * g_out).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-12)
    gu, gd = layer.experts.w_up_EHD.grad[0], layer.experts.w_down_EDF.grad[0]
    if gated:
        torch.testing.assert_close(gu[:F], ffn.gate_proj.weight.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(gu[F:], ffn.up_proj.weight.grad, rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(gu, ffn.up_proj.weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(gd, ffn.down_proj.weight.grad, rtol=0, atol=1e-12)
    assert float(layer.router.weight.grad.abs().max()) < 1e-12  # softmax over one expert is constant


def test_identical_experts_with_k_equal_E_renormalised_equal_the_dense_ffn():
    E = 4
    layer = moesaic.moe_layer(D, F, E, E, router={"normalization": "renorm"}).double()
    with torch.no_grad():
        for e in range(1, E):
            layer.experts.w_up_EHD[e].copy_(layer.experts.w_up_EHD[0])
            layer.experts.w_down_EDF[e].copy_(layer.experts.w_down_EDF[0])
    ffn = copy_into_dense(layer, True, "silu")
    x = torch.randn(9, D, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ffn(x), rtol=0, atol=1e-12)


def test_aux_coefficient_zero_gives_exactly_zero_aux_gradient():
    """Coefficient 0 adds nothing to the router gradient (bit for bit); > 0 adds a non-zero gradient."""
    x = torch.randn(24, D, dtype=torch.float64)

    def router_grads(coef):
        torch.manual_seed(0)
        layer = moesaic.moe_layer(D, F, 4, 2, router={"aux_loss_coef": coef, "z_loss_coef": coef}).double()
        out = layer(x).square().sum()
        (g_out,) = torch.autograd.grad(out, layer.router.weight, retain_graph=True)
        (g_all,) = torch.autograd.grad(out + moesaic.collect_aux_losses(layer), layer.router.weight)
        return layer, g_out, g_all

    layer, g_out, g_all = router_grads(0.0)
    assert layer.aux_losses == {}
    assert torch.equal(g_all, g_out)
    layer, g_out, g_all = router_grads(0.01)
    assert set(layer.aux_losses) == {"balance", "z"}
    assert float((g_all - g_out).abs().max()) > 0


def test_unused_experts_still_get_a_grad():
    """An expert that received no token has .grad (zeros) after backward, for every backend."""
    from moesaic.moe.experts.backends import BACKENDS

    for backend in BACKENDS.names():
        layer = moesaic.moe_layer(D, F, 4, 1, router={"kind": "switch"}, experts={"backend": backend})
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[2, 0] = 10.0
        x = torch.randn(6, D)
        x[:, 0] = 1.0
        layer(x).sum().backward()
        assert layer.last_stats["tokens_per_expert"].tolist() == [0, 0, 6, 0]
        for name, p in layer.named_parameters():
            assert p.grad is not None, (backend, name)
        assert float(layer.experts.w_up_EHD.grad[[0, 1, 3]].abs().sum()) == 0.0
        assert float(layer.experts.w_up_EHD.grad[2].abs().sum()) > 0


def test_all_padding_batch_with_shared_experts():
    layer = moesaic.moe_layer(D, F, 4, 2, shared_experts={"num": 1, "gate": "sigmoid"})
    x = torch.randn(2, 3, D)
    y = layer(x, mask=torch.zeros(2, 3, dtype=torch.bool))
    loss = y.sum() + moesaic.collect_aux_losses(layer)
    assert torch.isfinite(loss) and float(y.detach().abs().sum()) == 0.0
    loss.backward()
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("gate,combine", [("none", "sum"), ("sigmoid", "sum"), ("none", "average")])
def test_shared_experts(gate, combine):
    """DeepSeekMoE: K_s shared experts built as one FFN of width K_s * F equal the sum of K_s FFNs;
    Qwen2-MoE scales by sigmoid(x w_g); GNT-MOVE averages."""
    layer = moesaic.moe_layer(D, F, 4, 2, shared_experts={"num": 2, "gate": gate, "combine": combine}).double()
    routed_only = moesaic.moe_layer(D, F, 4, 2).double()
    routed_only.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared")})
    x = torch.randn(10, D, dtype=torch.float64)
    sh = layer.shared_experts
    parts = []
    for j in range(2):  # two separate F-wide SwiGLU experts from the halves of the fused one
        f = DenseFFN(D, F, "silu", True).double()
        with torch.no_grad():
            f.gate_proj.weight.copy_(sh.gate_proj.weight[j * F:(j + 1) * F])
            f.up_proj.weight.copy_(sh.up_proj.weight[j * F:(j + 1) * F])
            f.down_proj.weight.copy_(sh.down_proj.weight[:, j * F:(j + 1) * F])
        parts.append(f(x))
    s = parts[0] + parts[1]
    if gate == "sigmoid":
        s = torch.sigmoid(layer.shared_gate(x)) * s
    r = routed_only(x)
    ref = (r + s) / 2 if combine == "average" else r + s
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-12)


def test_collect_aux_losses_sums_layers_and_each_forward_replaces():
    model = nn.Sequential(moesaic.moe_layer(D, F, 4, 2), moesaic.moe_layer(D, F, 4, 2, router={"z_loss_coef": 1e-3}))
    x = torch.randn(8, D)
    model(x)
    first = moesaic.collect_aux_losses(model)
    by_name = moesaic.collect_aux_losses(model, by_name=True)
    assert set(by_name) == {"balance", "z"}
    torch.testing.assert_close(first, sum(by_name.values()))
    manual = sum(sum(m.aux_losses.values()) for m in moesaic.moe_layers(model))
    torch.testing.assert_close(first, manual)
    model(x)
    torch.testing.assert_close(moesaic.collect_aux_losses(model), first)  # not accumulated across forwards
    assert float(moesaic.collect_aux_losses(nn.Linear(2, 2))) == 0.0


def test_layer_names_reach_error_messages():
    model = nn.ModuleDict({"block0": nn.ModuleDict({"moe": moesaic.moe_layer(D, F, 4, 2)})})
    moesaic.name_layers(model)
    with pytest.raises(moesaic.NonFiniteInputError, match=r"block0\.moe"):
        model["block0"]["moe"](torch.full((3, D), float("nan")))


@pytest.mark.parametrize("router", ["topk", "switch", "gshard", "noisy_topk", "expert_choice"])
def test_nan_in_padding_is_ignored_but_nan_in_real_tokens_raises(router):
    k = 1 if router == "switch" else 2
    layer = moesaic.moe_layer(D, F, 4, k, router={"kind": router},
                              shared_experts={"num": 1, "gate": "sigmoid"}).double().eval()
    x = torch.randn(10, D, dtype=torch.float64)
    mask = torch.ones(10, dtype=torch.bool)
    mask[7:] = False
    ref = layer(x[:7])
    x_bad = x.clone()
    x_bad[7:] = float("nan")
    x_bad = x_bad.requires_grad_()
    y = layer(x_bad, mask=mask)
    torch.testing.assert_close(y[:7], ref, rtol=0, atol=1e-12)
    assert torch.equal(y[7:], torch.zeros_like(y[7:]))
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    x_bad = x.clone()
    x_bad[2, 0] = float("inf")
    with pytest.raises(moesaic.NonFiniteInputError, match="1 of 7 valid tokens"):
        layer(x_bad, mask=mask)


def test_finite_input_whose_sum_overflows_is_not_rejected():
    """The non-finite check looks at the sum first; a finite input with an overflowing sum must pass,
    and +inf/-inf together (a NaN sum) must still be caught."""
    layer = moesaic.moe_layer(D, F, 4, 2)
    x = torch.full((4, D), 3e38)
    assert not torch.isfinite(x.sum()) and torch.isfinite(x).all()
    layer.router(x)  # no NonFiniteInputError
    x[0, 0], x[1, 0] = float("inf"), float("-inf")
    with pytest.raises(moesaic.NonFiniteInputError, match="2 of 4 valid tokens"):
        layer.router(x)


def test_mask_of_the_wrong_shape_is_a_typed_error_naming_the_layer():
    layer = moesaic.moe_layer(D, F, 4, 2)
    layer.layer_name = "blocks.2.moe"
    with pytest.raises(moesaic.core.errors.RoutingInputError, match=r"blocks\.2\.moe.*\(2, 4\)"):
        layer(torch.randn(2, 5, D), mask=torch.ones(2, 4, dtype=torch.bool))
