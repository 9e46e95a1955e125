"""Soft MoE (Puigcerver et al. 2024): weights, permutation equivariance, n = p = 1 mean, brute force, causality."""

import pytest
import torch

import moesaic
from moesaic.core.errors import CausalityError, ConfigError
from moesaic.core.types import DispatchPlan
from moesaic.moe.dispatch.soft import soft_weights


def _layer(E=3, p=2, **router):
    return moesaic.moe_layer(16, 32, E, 1, router={"kind": "soft_moe", "slots_per_expert": p, "init_std": 0.5,
                                                    **router}, dispatcher={"kind": "soft"}).double()


def _brute(layer, x_MD):
    """One sequence with explicit loops over tokens, slots and experts."""
    r = layer.router
    phi = r.phi_SD
    xs = x_MD
    if r.cfg.normalize:
        xs = x_MD / x_MD.norm(dim=-1, keepdim=True)
        phi = r.scale * phi / phi.norm(dim=-1, keepdim=True)
    m, S, p = x_MD.shape[0], phi.shape[0], r.cfg.slots_per_expert
    L = torch.tensor([[float((xs[i] @ phi[s]).detach()) for s in range(S)] for i in range(m)], dtype=torch.float64)
    D, C = L.softmax(0), L.softmax(1)
    slots = [sum(D[i, s] * x_MD[i] for i in range(m)) for s in range(S)]
    counts = torch.zeros(layer.experts.num_experts, dtype=torch.long)
    y_slots = []
    for s in range(S):
        counts.zero_()
        counts[s // p] = 1
        y_slots.append(layer.experts(slots[s][None], DispatchPlan.grouped(counts))[0])
    return torch.stack([sum(C[i, s] * y_slots[s] for s in range(S)) for i in range(m)])


def test_property1_dispatch_columns_and_combine_rows_sum_to_one():
    L = torch.randn(2, 5, 6, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    D, C = soft_weights(L, mask)
    torch.testing.assert_close(D.sum(1), torch.ones(2, 6, dtype=torch.float64))
    torch.testing.assert_close(C[mask].sum(-1), torch.ones(8, dtype=torch.float64))
    assert (D[1, 3:] == 0).all() and (C[1, 3:] == 0).all()


@pytest.mark.parametrize("normalize", [False, True])
def test_property4_brute_force_per_sequence(normalize):
    layer = _layer(normalize=normalize)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    y = layer(x)
    for b in range(2):
        torch.testing.assert_close(y[b], _brute(layer, x[b]), atol=1e-10, rtol=0)
    assert torch.equal(layer.last_stats["tokens_per_expert"], torch.tensor([4, 4, 4]))  # B * p slots each


def test_property2_permutation_equivariant():
    layer = _layer()
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    perm = torch.randperm(7)
    torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm], atol=1e-12, rtol=0)


def test_property3_one_slot_zero_phi_is_ffn_of_mean(ref):
    layer = _layer(E=1, p=1)
    torch.nn.init.zeros_(layer.router.phi_SD)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    y = layer(x)
    for b in range(2):
        want = ref.expert_out(layer, 0, x[b].mean(0, keepdim=True)).expand(6, 16)
        torch.testing.assert_close(y[b], want, atol=1e-12, rtol=0)


def test_padding_invariance_and_gradients():
    layer = _layer()
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    y = layer(x, mask=mask)
    assert (y[0, 4:] == 0).all()
    torch.testing.assert_close(y[0, :4], layer(x[:1, :4])[0], atol=1e-12, rtol=0)
    y.sum().backward()
    assert layer.router.phi_SD.grad.abs().sum() > 0 and (x.grad[0, 4:] == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_masked_padding_is_ignored(bad):
    """Padding may hold anything (as for every router): NaN or inf in masked rows raises nothing, and outputs
    and gradients (input and slot parameters) equal those with zero padding; NaN in a real token raises."""
    layer = _layer()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    runs = []
    for fill in (0.0, bad):
        xi = x.clone()
        xi[0, 4:] = fill
        xi.requires_grad_()
        layer.zero_grad()
        y = layer(xi, mask=mask)
        y.square().sum().backward()
        runs.append((y.detach(), xi.grad, layer.router.phi_SD.grad.clone()))
    (y0, gx0, gp0), (y1, gx1, gp1) = runs
    torch.testing.assert_close(y1, y0, atol=1e-12, rtol=0)
    assert (y1[0, 4:] == 0).all() and (gx1[0, 4:] == 0).all()
    torch.testing.assert_close(gx1, gx0, atol=1e-12, rtol=0)
    torch.testing.assert_close(gp1, gp0, atol=1e-12, rtol=0)
    x[1, 2, 3] = bad
    with pytest.raises(moesaic.NonFiniteInputError, match="1 of 10 valid tokens"):
        layer(x, mask=mask)


def test_refuses_causal_and_needs_soft_dispatcher():
    with pytest.raises(CausalityError, match="soft_moe"):
        moesaic.moe_layer(16, 32, 2, 1, router={"kind": "soft_moe"}, dispatcher={"kind": "soft"}, causal=True)
    with pytest.raises(ConfigError, match="dispatcher"):
        moesaic.moe_layer(16, 32, 2, 1, router={"kind": "soft_moe"})
