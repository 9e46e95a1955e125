"""DiT-MoE shared expert + expert-level balance (Fei et al. 2024) and GNT-MOVE permanent expert,
built from their recipes in configs/papers/."""

from pathlib import Path

import pytest
import torch

from moesaic.core.types import DispatchPlan
from moesaic.train.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[2]


def build(name):
    cfg = load_run_config(ROOT / "configs" / "papers" / f"{name}.yaml", [])
    model = cfg.model.build().double()
    return model, model.moe


def routed_reference(layer, x):
    """Brute force sum_e w[t, e] * FFN_e(x[t]) from the dense routing weights (Appendix A)."""
    w_TE = layer.router(x).dense()
    E = layer.num_experts
    out = torch.zeros_like(x)
    for e in range(E):
        counts = torch.zeros(E, dtype=torch.long)
        counts[e] = x.shape[0]
        out = out + w_TE[:, e:e + 1] * layer.experts(x, DispatchPlan.grouped(counts), backend="loop")
    return out


# --------------------------------------------------------------------------------------------- DiT-MoE
def test_dit_moe_recipe_shapes():
    model, layer = build("dit_moe")
    D = model.cfg.d_model
    assert layer.experts.w_up_EHD.shape == (8, 2 * 4 * D, D)  # SwiGLU experts of width 4d
    assert layer.shared_experts.d_ff == 2 * D and layer.shared_experts.gated  # one SwiGLU of width 2d
    assert layer.top_k == 2 and layer.router.cfg.normalization == "none"
    assert not any(p.dim() == 1 for p in layer.shared_experts.parameters())  # no biases


def test_dit_moe_output_is_routed_sum_plus_shared_and_matches_brute_force():
    _, layer = build("dit_moe")
    x = torch.randn(24, layer.d_model, dtype=torch.float64)
    y = layer(x)
    assert torch.allclose(y, routed_reference(layer, x) + layer.shared_experts(x), atol=1e-12)


def test_dit_moe_weights_are_variant_a():
    _, layer = build("dit_moe")
    x = torch.randn(10, layer.d_model, dtype=torch.float64)
    p = layer.router.logits(x).softmax(-1)
    top = p.topk(2)
    assert torch.allclose(layer.router(x).dense(), torch.zeros_like(p).scatter(1, top.indices, top.values))


def test_dit_moe_shared_contribution_does_not_depend_on_the_router():
    _, layer = build("dit_moe")
    x = torch.randn(16, layer.d_model, dtype=torch.float64)
    shared = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        layer.router.reset_parameters()
        shared.append(layer(x) - routed_reference(layer, x))
    assert torch.allclose(shared[0], shared[1], atol=1e-12)
    assert torch.allclose(shared[0], layer.shared_experts(x), atol=1e-12)


def test_dit_moe_expert_level_balance_golden_and_uniform():
    _, layer = build("dit_moe")
    x = torch.randn(32, layer.d_model, dtype=torch.float64)
    d = layer.router(x)
    T, E, k = 32, 8, 2
    ce = d.tokens_per_expert().double() / (T * k)
    P = d.probs_TE.mean(0)
    assert d.aux_losses["balance"].item() == pytest.approx((E * ce * P).sum().item(), rel=1e-12)
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform p
    layer(x)
    assert layer.aux_losses["balance"].item() == pytest.approx(0.01)  # L / alpha == 1


# -------------------------------------------------------------------------------------------- GNT-MOVE
def test_gnt_move_recipe_and_average_combine():
    model, layer = build("gnt_move")
    D = model.cfg.d_model
    perm = layer.shared_experts
    assert perm.d_ff == 4 * D and not perm.gated and perm.activation == "relu" and perm.up_proj.bias is not None
    h = torch.randn(20, D, dtype=torch.float64)
    y = layer(h)
    assert torch.allclose(y, (routed_reference(layer, h) + perm(h)) / 2, atol=1e-12)
    ref_perm = torch.relu(h @ perm.up_proj.weight.t() + perm.up_proj.bias) @ perm.down_proj.weight.t()
    assert torch.allclose(perm(h), ref_perm + perm.down_proj.bias, atol=1e-12)


def test_gnt_move_zero_moe_output_leaves_half_the_permanent_expert():
    model, layer = build("gnt_move")
    with torch.no_grad():
        layer.experts.w_down_EDF.zero_()  # MoE output forced to 0
    x = torch.randn(2, 6, model.cfg.d_in, dtype=torch.float64)
    h = model.inp(x)
    assert torch.allclose(layer(h), layer.shared_experts(h) / 2, atol=1e-12)
    assert torch.allclose(model(x), model.out(h + layer.shared_experts(h) / 2), atol=1e-12)


@pytest.mark.parametrize("name", ["moepp", "moepp_release", "evomoe_dts", "ewa", "shiftaddvit_latency", "dit_moe",
                                  "gnt_move"])
def test_recipe_builds_and_runs(name):
    model, _ = build(name)
    x = torch.randn(2, 5, model.cfg.d_in, dtype=torch.float64)
    assert model(x).shape == (2, 5, 1)
