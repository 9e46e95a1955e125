"""Recovery distillation after MoEfication (moesaic.transforms.moefy_recover): it moves the sparse model
towards the dense one on the calibration inputs, trains only the split experts (routers, attention and
embeddings bit-identical), restores the requires_grad flags, and is refused without calibration data."""

import copy
from types import SimpleNamespace

import pytest
import torch

from moefy_fixtures import bert, llm
from moesaic.core.errors import ConfigError, ConversionError
from moesaic.moe.moefied import MoEfiedFFN
from moesaic.transforms.moefy import MoefyConfig, moefy_
from moesaic.transforms.moefy_recover import capture_calls, distill_loss, recover_


def _calib(m):
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(0, 50, (8, 12), generator=g)
        if hasattr(m(ids[:1]), "last_hidden_state"):
            mask = torch.ones_like(ids)
            mask[:4, 9:] = 0  # padded rows: the pooled objective must ignore them
            m(ids, attention_mask=mask)
        else:
            m(ids)


def _loss(student, teacher, calls):
    with torch.no_grad():
        return sum(float(distill_loss(student(*a, **k), teacher(*a, **k), (a, k))) for a, k in calls) / len(calls)


@pytest.mark.parametrize("make", [bert, llm], ids=["gelu_bert_pooled_cosine", "swiglu_lm_kl"])
def test_recovery_reduces_the_distillation_loss_and_trains_only_the_experts(make):
    torch.manual_seed(0)
    dense = make()
    with torch.no_grad():  # sharper next-token distributions than a random init gives (KL ~1e-6 otherwise)
        for p in dense.parameters():
            p.mul_(2.0)
    calls = capture_calls(dense, _calib)
    assert [c[0][0].shape for c in calls] == [(1, 12), (8, 12)] * 2
    plain = copy.deepcopy(dense)
    moefy_(plain, MoefyConfig(num_experts=4, active_fraction=0.25, router="avgk"))
    cfg = MoefyConfig(num_experts=4, active_fraction=0.25, router="avgk", recover_steps=60, recover_lr=3e-3,
                      recover_batch=4)
    rec = copy.deepcopy(dense)
    moefy_(rec, cfg, calibrate=_calib)
    before, after = _loss(plain, dense, calls), _loss(rec, dense, calls)
    assert after < 0.5 * before, (before, after)
    ps, pr = dict(plain.named_parameters()), dict(rec.named_parameters())
    trained = {n for n, p in pr.items() if not torch.equal(p, ps[n])}
    assert trained and all(n.rsplit(".", 1)[-1] in ("w_in_EHD", "b_in_EH", "w_out_EDF", "b_out_D") for n in trained)
    assert all(p.requires_grad and p.grad is None for p in rec.parameters())
    assert not rec.training


def test_pooled_objective_ignores_padded_positions():
    torch.manual_seed(0)
    dense = bert()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        out = dense(ids, attention_mask=mask)
    h = out.last_hidden_state.clone()
    h[1, 4:] += 100.0  # only padded positions differ
    noisy = SimpleNamespace(last_hidden_state=h)
    call = ((ids,), {"attention_mask": mask})
    assert float(distill_loss(noisy, out, call)) < 1e-10
    h[1, 0] += 1.0
    assert float(distill_loss(noisy, out, call)) > 1e-6


def test_recovery_needs_calibration_data_and_moefied_layers():
    m = bert()
    with pytest.raises(ConfigError, match="recover_steps"):
        moefy_(m, MoefyConfig(num_experts=4, recover_steps=5))
    assert not any(isinstance(x, MoEfiedFFN) for x in m.modules())
    with pytest.raises(ConversionError, match="no MoEfied FFN"):
        recover_(m, copy.deepcopy(m), capture_calls(m, _calib), steps=1, lr=1e-3, batch=2)
    with pytest.raises(ConversionError, match="never called"):
        capture_calls(m, lambda mod: None)


def test_calibration_runs_once_for_a_learned_router_with_recovery():
    runs = []

    def calib(m):
        runs.append(1)
        _calib(m)

    m = bert()
    moefy_(m, MoefyConfig(num_experts=4, active_fraction=0.5, router="mlp", mlp_steps=2, recover_steps=2),
           calibrate=calib)
    assert len(runs) == 1
    assert all(isinstance(layer.mlp, MoEfiedFFN) and layer.mlp.scorer is not None for layer in m.layers)
