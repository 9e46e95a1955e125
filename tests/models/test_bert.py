"""``bert_encoder`` against a float64 brute-force reference written from the BERT paper's equations
(explicit softmax over the real keys, LayerNorm from its definition), values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from moesaic.core.config import ConfigError, parse, validate_tree
from moesaic.models.bert import BertEncoder, BertEncoderConfig


def _cfg(**kw) -> BertEncoderConfig:
    base = dict(vocab_size=40, d_model=12, num_layers=2, num_heads=3, d_ff=20, max_position_embeddings=16,
                type_vocab_size=2, layer_norm_eps=1e-7, pooler=True)
    return validate_tree(parse(BertEncoderConfig, {**base, **kw}, "model"), "model")


def _model(**kw) -> BertEncoder:
    torch.manual_seed(0)
    m = BertEncoder(_cfg(**kw)).double()
    with torch.no_grad():
        for n, p in m.named_parameters():  # non-trivial norms and biases
            p.add_(0.3 * torch.randn_like(p)) if ("norm" in n or n.endswith("bias")) else p.mul_(10.0)
    return m


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def reference(m: BertEncoder, ids, mask, types):
    """Per sequence, per head, per query: softmax over the real keys; exact erf GELU."""
    c, P = m.cfg, dict(m.named_parameters())
    B, S = ids.shape
    H, d = c.num_heads, c.d_model // c.num_heads
    lin = lambda x, name: x @ P[name + ".weight"].T + P[name + ".bias"]
    h = P["embeddings.word_embeddings.weight"][ids] + P["embeddings.position_embeddings.weight"][torch.arange(S)]
    if types is not None:
        h = h + P["embeddings.token_type_embeddings.weight"][types]
    h = _layer_norm(h, P["embeddings.norm.weight"], P["embeddings.norm.bias"], c.layer_norm_eps)
    for i in range(c.num_layers):
        p = f"layers.{i}."
        q, k, v = (lin(h, p + f"self_attn.{n}_proj").view(B, S, H, d) for n in "qkv")
        rows = []
        for b in range(B):
            real = [j for j in range(S) if mask[b, j]]
            heads = []
            for hh in range(H):
                scores = torch.stack([q[b, :, hh] @ k[b, j, hh] for j in real], -1) / math.sqrt(d)
                heads.append(torch.softmax(scores, -1) @ v[b, real, hh])
            rows.append(torch.cat(heads, -1))
        a = lin(torch.stack(rows), p + "self_attn.o_proj")
        h = _layer_norm(h + a, P[p + "attn_norm.weight"], P[p + "attn_norm.bias"], c.layer_norm_eps)
        f = lin(0.5 * (u := lin(h, p + "mlp.up_proj")) * (1 + torch.erf(u / math.sqrt(2))), p + "mlp.down_proj")
        h = _layer_norm(h + f, P[p + "ffn_norm.weight"], P[p + "ffn_norm.bias"], c.layer_norm_eps)
    return h, (torch.tanh(lin(h[:, 0], "pooler")) if c.pooler else None)


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 40, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    return ids, mask, torch.randint(0, 2, (3, 7), generator=g)


def test_matches_float64_reference_with_padding():
    m = _model()
    ids, mask, types = _batch()
    out = m(ids, attention_mask=mask, token_type_ids=types)
    want_h, want_p = reference(m, ids, mask, types)
    assert (out.last_hidden_state - want_h).abs().max().item() < 1e-10
    assert (out.pooler_output - want_p).abs().max().item() < 1e-10


def test_gradients_match_reference():
    m = _model()
    ids, mask, types = _batch()
    g = torch.Generator().manual_seed(5)
    w_BSD, w_BD = torch.randn(3, 7, 12, dtype=torch.float64, generator=g), torch.randn(3, 12, dtype=torch.float64)
    out = m(ids, attention_mask=mask, token_type_ids=types)
    ((out.last_hidden_state * w_BSD).sum() + (out.pooler_output * w_BD).sum()).backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    h, pooled = reference(m, ids, mask, types)
    ((h * w_BSD).sum() + (pooled * w_BD).sum()).backward()
    for n, p in m.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-9, rtol=1e-7), n
        assert p.grad.abs().sum() > 0, n


def test_without_token_types_and_mask():
    m = _model(type_vocab_size=0, pooler=False)
    ids, mask, _ = _batch()
    out = m(ids)
    want, _ = reference(m, ids, torch.ones_like(mask), None)
    assert m.embeddings.token_type_embeddings is None and out.pooler_output is None
    assert (out.last_hidden_state - want).abs().max().item() < 1e-10


def test_bad_inputs_are_named():
    m = _model()
    ids, mask, types = _batch()
    with pytest.raises(ConfigError, match=r"input_ids.shape\[1\] = 17: must be at most max_position_embeddings"):
        m(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ConfigError, match="attention_mask"):
        m(ids, attention_mask=mask[:, :5])
    with pytest.raises(ConfigError, match="model.num_heads = 5: must divide d_model"):
        _cfg(num_heads=5)
