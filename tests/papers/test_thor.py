"""THOR stochastic experts (Zuo et al. 2022): draws, inference levels, consistency loss, two-pass step."""

import pytest
import torch
from torch import nn

import moesaic
from moesaic.core.errors import ConfigError
from moesaic.moe.routing.thor import thor_consistency_loss
from moesaic.train.objectives.thor import thor_step

V = 11


class TinyLM(nn.Module):
    """Embedding -> residual THOR MoE -> vocabulary logits."""

    def __init__(self, E, **router):
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.moe = moesaic.moe_layer(16, 32, E, 1, router={"kind": "thor", **router})
        self.out = nn.Linear(16, V)

    def forward(self, ids, mask=None):
        h = self.emb(ids)
        return self.out(h + self.moe(h, mask=mask))


def _loss_fn(model, batch):
    ids, tgt, mask = batch
    logits = model(ids, mask)
    ce = nn.functional.cross_entropy(logits[mask], tgt[mask], reduction="sum")
    return ce, logits, mask


def _batch():
    ids = torch.randint(0, V, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 4:] = False
    return ids, torch.randint(0, V, (3, 6)), mask


def test_cr_golden_nonnegative_symmetric_masked():
    l1, l2 = torch.randn(2, 5, V, dtype=torch.float64), torch.randn(2, 5, V, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    cr = thor_consistency_loss(l1, l2, mask)
    p1, p2 = l1.softmax(-1)[mask], l2.softmax(-1)[mask]
    kl12 = (p1 * (p1.log() - p2.log())).sum()
    kl21 = (p2 * (p2.log() - p1.log())).sum()
    torch.testing.assert_close(cr, 0.5 * (kl12 + kl21), atol=1e-12, rtol=0)
    assert cr > 0
    torch.testing.assert_close(thor_consistency_loss(l2, l1, mask), cr, atol=1e-12, rtol=0)
    assert thor_consistency_loss(l1, l1, mask) == 0
    l2_pad = l2.clone()
    l2_pad[1, 3:] = 100.0  # padded positions do not count
    torch.testing.assert_close(thor_consistency_loss(l1, l2_pad, mask), cr, atol=1e-12, rtol=0)


def test_property1_cr_zero_when_both_passes_draw_the_same_experts():
    model = TinyLM(4)
    batch = _batch()

    def same_draws(m, b):
        torch.manual_seed(7)  # both passes draw the same experts
        return _loss_fn(m, b)

    out = thor_step(model, batch, same_draws, alpha=5.0)
    assert out.cr.item() == 0.0
    torch.manual_seed(1)
    outs = [thor_step(model, batch, _loss_fn, alpha=5.0) for _ in range(6)]
    assert all(o.cr.item() >= 0 for o in outs) and any(o.cr.item() > 0 for o in outs)
    o = outs[0]
    torch.testing.assert_close(o.loss, o.ce1 + o.ce2 + 5.0 * o.cr.float())


def test_property2_one_expert_loss_is_twice_dense_ce(ref):
    model = TinyLM(1)
    batch = _batch()
    ids, tgt, mask = batch
    h = model.emb(ids)
    dense = model.out(h + ref.expert_out(model.moe, 0, h.reshape(-1, 16)).reshape(h.shape) * mask[..., None])
    ce_dense = nn.functional.cross_entropy(dense[mask], tgt[mask], reduction="sum")
    out = thor_step(model, batch, _loss_fn, alpha=1.0)
    assert out.cr.item() == pytest.approx(0.0, abs=1e-10)
    torch.testing.assert_close(out.loss, 2 * ce_dense)
    out.loss.backward()  # gradients flow through both passes
    assert model.moe.experts.w_up_EHD.grad.abs().sum() > 0


def test_training_granularity_batch_sequence_token():
    x = torch.randn(3, 5, 16)
    for gran, check in (("batch", lambda e: e.unique().numel() == 1),
                        ("sequence", lambda e: all(r.unique().numel() == 1 for r in e.view(3, 5))),
                        ("token", lambda e: True)):
        layer = moesaic.moe_layer(16, 32, 8, 1, router={"kind": "thor", "granularity": gran}).train()
        torch.manual_seed(0)
        layer(x)
        d = layer.router(x.reshape(-1, 16), seq_ids_T=torch.arange(3).repeat_interleave(5))
        e_T = d.to_topk()[0][:, 0]
        assert check(e_T), gran
        assert torch.equal(d.weight_N, torch.ones(15))
    torch.manual_seed(0)
    a = layer.router(x.reshape(-1, 16)).expert_idx_N
    torch.manual_seed(0)
    assert torch.equal(layer.router(x.reshape(-1, 16)).expert_idx_N, a)  # reproducible with a fixed seed


def test_property3_inference_level1_sentence_uses_one_expert(ref):
    layer = moesaic.moe_layer(16, 32, 4, 1, router={"kind": "thor", "inference_level": 1}).double().eval()
    x = torch.randn(4, 6, 16, dtype=torch.float64)
    seq = torch.arange(4).repeat_interleave(6)
    torch.manual_seed(3)
    e_T = layer.router(x.reshape(-1, 16), seq_ids_T=seq).to_topk()[0][:, 0].view(4, 6)
    assert all(r.unique().numel() == 1 for r in e_T)
    torch.manual_seed(3)
    y = layer(x)
    for b in range(4):
        torch.testing.assert_close(y[b], ref.expert_out(layer, int(e_T[b, 0]), x[b]), atol=1e-12, rtol=0)
    avg = moesaic.moe_layer(16, 32, 4, 1, router={"kind": "thor", "inference_average": True}).double().eval()
    xf = x.reshape(-1, 16)
    mean = sum(ref.expert_out(avg, e, xf) for e in range(4)) / 4
    torch.testing.assert_close(avg(xf), mean, atol=1e-12, rtol=0)


def test_property4_usage_about_uniform():
    torch.manual_seed(0)
    E, n = 4, 4000
    layer = moesaic.moe_layer(16, 32, E, 1, router={"kind": "thor"}).train()
    x = torch.randn(1, 16)
    draws = torch.stack([layer.router(x).expert_idx_N[0] for _ in range(n)])
    freq = torch.bincount(draws, minlength=E).double() / n
    assert (freq - 1 / E).abs().max() < 0.03  # 4.4 sigma at n = 4000
    tok = moesaic.moe_layer(16, 32, E, 1, router={"kind": "thor"}).eval()  # level 0: per token
    freq = tok.router(torch.randn(n, 16)).tokens_per_expert().double() / n
    assert (freq - 1 / E).abs().max() < 0.03
    with pytest.raises(ConfigError, match="top_k"):
        moesaic.moe_layer(16, 32, E, 2, router={"kind": "thor"})
