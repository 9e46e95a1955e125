"""Golden values and properties of the shared router losses (Switch, DeepSeekMoE expert and device level,
DeepSeek-V3 sequence-wise, ST-MoE z-loss, CV^2), each through its statistic's value; empty batches give 0."""

from __future__ import annotations

import math

import pytest
import torch

from moesaic.moe.routing import losses

E, T = 8, 64


def uniform_probs(T=T, E=E):
    return torch.full((T, E), 1.0 / E, dtype=torch.float64)


def round_robin_counts(T=T, E=E, k=1):
    ids = (torch.arange(T * k) % E)
    return torch.bincount(ids, minlength=E)


def test_switch_balance_is_one_at_uniform_and_E_at_collapse():
    assert abs(float(losses.SwitchBalance(uniform_probs(), round_robin_counts()).value()) - 1.0) < 1e-12
    p = torch.zeros(T, E, dtype=torch.float64)
    p[:, 3] = 1.0
    counts = torch.zeros(E, dtype=torch.long)
    counts[3] = T
    assert abs(float(losses.SwitchBalance(p, counts).value()) - E) < 1e-12
    # k = 2 choices counted (Mixtral/DeepSeek expert-level form) still gives 1 at uniform
    assert abs(float(losses.SwitchBalance(uniform_probs(), round_robin_counts(k=2)).value()) - 1.0) < 1e-12


def test_switch_balance_gradient_flows_through_P_only():
    """f is a count (no gradient): d L / d z equals the gradient of E * sum stopgrad(f) * P."""
    z = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    p = z.softmax(-1)
    counts = torch.bincount(p.argmax(-1), minlength=E)
    (g,) = torch.autograd.grad(losses.SwitchBalance(p, counts).value(), z)
    f = counts.double() / T
    (g_ref,) = torch.autograd.grad(E * (f * z.softmax(-1).mean(0)).sum(), z)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)
    assert torch.isfinite(g).all()
    # perfect balance: finite gradient (vmoe #218)
    zu = torch.zeros(T, E, dtype=torch.float64, requires_grad=True)
    (gu,) = torch.autograd.grad(losses.SwitchBalance(zu.softmax(-1), round_robin_counts()).value(), zu)
    assert torch.isfinite(gu).all()


def test_expert_balance_matches_deepseekmoe_formula():
    """DeepSeekMoE expert-level: f_i = N'/(K'T) count_i, P_i = mean s; 1 uniform; E at collapse with K'=1."""
    K = 3
    z = torch.randn(T, E, dtype=torch.float64)
    s = z.softmax(-1)
    ids = s.topk(K, dim=-1).indices
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    f = E / (K * T) * counts.double()
    ref = (f * s.mean(0)).sum()
    assert abs(float(losses.SwitchBalance(s, counts).value() - ref)) < 1e-12
    assert abs(float(losses.SwitchBalance(uniform_probs(), round_robin_counts(k=K)).value()) - 1.0) < 1e-12
    p = torch.zeros(T, E, dtype=torch.float64)
    p[:, 0] = 1
    collapsed = torch.bincount(torch.zeros(T, dtype=torch.long), minlength=E)
    assert abs(float(losses.SwitchBalance(p, collapsed).value()) - E) < 1e-12


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_device_balance_one_at_uniform_and_reference(groups):
    assert abs(float(losses.DeviceBalance(uniform_probs(), round_robin_counts(k=2), groups).value()) - 1.0) < 1e-12
    K = 2
    s = torch.randn(T, E, dtype=torch.float64).softmax(-1)
    counts = torch.bincount(s.topk(K, -1).indices.reshape(-1), minlength=E)
    f = E / (K * T) * counts.double()
    P = s.mean(0)
    ref = sum(f[d * E // groups:(d + 1) * E // groups].mean() * P[d * E // groups:(d + 1) * E // groups].sum()
              for d in range(groups))
    assert abs(float(losses.DeviceBalance(s, counts, groups).value() - ref)) < 1e-12


def test_sequence_balance_one_at_uniform_and_per_sequence_reference():
    K, S, L = 2, 4, 16
    seq = torch.arange(S).repeat_interleave(L)
    ids = (torch.arange(S * L * K) % E).view(S * L, K)
    s = torch.full((S * L, E), 0.3, dtype=torch.float64)  # sigmoid-like scores, equal -> uniform after norm
    assert abs(float(losses.SequenceBalance(s, ids, seq).value()) - 1.0) < 1e-12
    s = torch.randn(S * L, E, dtype=torch.float64).sigmoid()
    ids = s.topk(K, -1).indices
    vals = []
    for q in range(S):
        sq, iq = s[seq == q], ids[seq == q]
        Pq = (sq / sq.sum(-1, keepdim=True)).mean(0)
        fq = E / (K * L) * torch.bincount(iq.reshape(-1), minlength=E).double()
        vals.append((fq * Pq).sum())
    assert abs(float(losses.SequenceBalance(s, ids, seq).value() - torch.stack(vals).mean())) < 1e-12


def test_z_loss_golden_shift_and_sign():
    z = torch.zeros(T, E, dtype=torch.float64)
    assert abs(float(losses.z_loss(z).value()) - math.log(E) ** 2) < 1e-12
    z = torch.randn(T, E, dtype=torch.float64)
    c = 1.7
    lse = torch.logsumexp(z, -1)
    assert abs(float(losses.z_loss(z + c).value()) - float(((lse + c) ** 2).mean())) < 1e-12
    assert float(losses.z_loss(-5 + z).value()) >= 0
    # fp32 computation for bf16 logits (ST-MoE): same as computing the fp32 upcast
    zb = z.to(torch.bfloat16)
    assert losses.z_loss(zb).value().dtype == torch.float32
    assert float(losses.z_loss(zb).value()) == float(losses.z_loss(zb.float()).value())


def test_cv_squared_properties():
    v = torch.rand(E, dtype=torch.float64) + 0.1
    assert float(losses.cv_squared(torch.full((E,), 3.0, dtype=torch.float64))) == 0.0
    assert abs(float(losses.cv_squared(v) - losses.cv_squared(7.5 * v))) < 1e-9
    pop = v.var(unbiased=False) / (v.mean() ** 2 + 1e-10)
    unb = v.var(unbiased=True) / (v.mean() ** 2 + 1e-10)
    assert abs(float(losses.cv_squared(v) - pop)) < 1e-15
    assert abs(float(losses.cv_squared(v, unbiased=True) - unb)) < 1e-15
    assert float(losses.cv_squared(v[:1])) == 0.0


def test_empty_inputs_give_zero_not_nan():
    p = torch.zeros(0, E, dtype=torch.float64, requires_grad=True)
    counts = torch.zeros(E, dtype=torch.long)
    for v in (losses.SwitchBalance(p, counts).value(), losses.DeviceBalance(p, counts, 2).value(),
              losses.z_loss(p).value(),
              losses.SequenceBalance(p, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long)).value(),
              losses.router_entropy(p).value()):
        assert float(v.detach()) == 0.0
