"""Decoder LM and encoder classifier: shapes, causality, KV cache, padding, GQA, layer layout."""

import pytest
import torch

import moesaic
from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.layer import MoELayer
from moesaic.train.run_config import load_run_config

V = 40


def build(**model):
    base = {"kind": "decoder_lm", "vocab_size": V, "d_model": 16, "num_layers": 2, "d_ff": 32,
            "attention": {"num_heads": 4}, "moe": {"d_ff": 32, "num_experts": 4, "top_k": 2}}
    base.update(model)
    return load_run_config(data={"model": base}).model.build().double().eval()


@pytest.mark.parametrize("attention", [{"num_heads": 4}, {"num_heads": 4, "num_key_value_heads": 2, "qk_norm": True,
                                                         "bias": True}, {"num_heads": 2, "num_key_value_heads": 1}])
def test_shapes_and_causality(attention):
    m = build(attention=attention)
    ids = torch.randint(V, (2, 12))
    out = m(ids)
    assert out.logits.shape == (2, 12, V)
    assert torch.equal(m(ids, return_dict=False), out.logits)
    ids2 = ids.clone()
    ids2[:, 7:] = (ids2[:, 7:] + 1) % V  # change the future
    out2 = m(ids2)
    assert torch.allclose(out.logits[:, :7], out2.logits[:, :7], atol=1e-12, rtol=0)
    assert not torch.allclose(out.logits[:, 7:], out2.logits[:, 7:])


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_kv_cache_equals_full_recompute(kv_heads):
    m = build(attention={"num_heads": 4, "num_key_value_heads": kv_heads}, moe={"d_ff": 32, "num_experts": 4,
              "top_k": 2, "shared_experts": {"num": 1}}, first_k_dense=1)
    ids = torch.randint(V, (3, 5))
    g_cache = m.generate(ids, max_new_tokens=10, use_cache=True)
    g_full = m.generate(ids, max_new_tokens=10, use_cache=False)
    assert torch.equal(g_cache, g_full)
    # logits of an incremental pass equal the full pass at every position
    full = m(g_full).logits
    from moesaic.models.cache import KVCache

    cache = KVCache()
    first = m(g_full[:, :5], past_key_values=cache).logits
    steps = [first] + [m(g_full[:, t:t + 1], past_key_values=cache).logits for t in range(5, 15)]
    inc = torch.cat(steps, dim=1)
    assert cache.seq_len == 15
    torch.testing.assert_close(inc, full, atol=1e-10, rtol=0)


def test_sampling_seeded_and_top_p():
    m = build()
    ids = torch.randint(V, (2, 4))
    a = m.generate(ids, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = m.generate(ids, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # top_p tiny = greedy
    c = m.generate(ids, 8, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(c, m.generate(ids, 8))
    with pytest.raises(moesaic.ConfigError, match="context"):
        m.generate(ids, 1000)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_real_token_logits(side):
    m = build(moe={"d_ff": 32, "num_experts": 4, "top_k": 2, "shared_experts": {"num": 1}})
    a, b = torch.randint(V, (1, 9)), torch.randint(V, (1, 5))
    pad = torch.zeros(1, 4, dtype=torch.long)
    b_pad = torch.cat((pad, b), 1) if side == "left" else torch.cat((b, pad), 1)
    mask_b = torch.cat((torch.zeros(1, 4), torch.ones(1, 5)), 1) if side == "left" else \
        torch.cat((torch.ones(1, 5), torch.zeros(1, 4)), 1)
    batch = torch.cat((a, b_pad))
    mask = torch.cat((torch.ones(1, 9), mask_b)).long()
    out = m(batch, attention_mask=mask).logits
    ref_a, ref_b = m(a).logits, m(b).logits
    torch.testing.assert_close(out[0], ref_a[0], atol=1e-12, rtol=0)
    real = mask_b[0].bool()
    torch.testing.assert_close(out[1][real], ref_b[0], atol=1e-12, rtol=0)
    assert torch.isfinite(out).all()
    if side == "left":  # left-padded batched generation equals unbatched generation
        gen = m.generate(batch, 6, attention_mask=mask)
        torch.testing.assert_close(gen[1, 9:], m.generate(b, 6)[0, 5:])
        torch.testing.assert_close(gen[0, 9:], m.generate(a, 6)[0, 9:])


def test_gqa_equals_mha_with_repeated_kv_heads():
    g = build(attention={"num_heads": 4, "num_key_value_heads": 2}, moe=None)
    h = build(attention={"num_heads": 4}, moe=None)
    sd = g.state_dict()
    for i in range(2):
        for n in ("k_proj", "v_proj"):
            w = sd[f"model.layers.{i}.self_attn.{n}.weight"].view(2, 4, 16)  # [Hkv, d, D]
            sd[f"model.layers.{i}.self_attn.{n}.weight"] = w.repeat_interleave(2, 0).reshape(16, 16)
    h.load_state_dict(sd)
    ids = torch.randint(V, (2, 7))
    torch.testing.assert_close(h(ids).logits, g(ids).logits, atol=1e-12, rtol=0)


def test_layer_layout_and_hf_names():
    m = build(num_layers=5, moe_every=2, moe_offset=1, layer_overrides=[{"layers": [4], "dense": False},
                                                                           {"layers": [0], "d_ff": 8}])
    kinds = [type(layer.mlp) for layer in m.model.layers]
    assert kinds == [DenseFFN, MoELayer, DenseFFN, MoELayer, MoELayer]
    assert m.model.layers[0].mlp.d_ff == 8
    names = set(m.state_dict())
    for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
              "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.router.weight"):
        assert n in names, n
    assert [x.layer_name for x in moesaic.moe_layers(m)] == ["model.layers.1.mlp", "model.layers.3.mlp",
                                                              "model.layers.4.mlp"]
    d = build(first_k_dense=1, num_layers=3)
    assert [isinstance(x.mlp, MoELayer) for x in d.model.layers] == [False, True, True]


def test_tied_embeddings():
    m = build(tie_word_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in build().parameters())


def test_bad_config_names_field():
    with pytest.raises(moesaic.ConfigError, match="model.attention.num_key_value_heads"):
        build(attention={"num_heads": 4, "num_key_value_heads": 3})
    with pytest.raises(moesaic.ConfigError, match="model.layer_overrides.0.layers"):
        build(layer_overrides=[{"layers": [7], "dense": True}])


def test_rope_rotate_half_convention():
    from moesaic.models.rope import RotaryEmbedding, apply_rotary
    rope = RotaryEmbedding(4, theta=100.0)
    x = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]])
    cos, sin = rope(torch.tensor([[3]]), torch.float32)
    y = apply_rotary(x, cos, sin)[0, 0, 0]
    # pairs (x0, x2) rotate by angle 3 * 1, (x1, x3) by 3 * 100^-0.5
    for i, f in ((0, 1.0), (1, 0.1)):
        a = torch.tensor(3 * f)
        assert torch.allclose(y[i], x[0, 0, 0, i] * a.cos() - x[0, 0, 0, i + 2] * a.sin())
        assert torch.allclose(y[i + 2], x[0, 0, 0, i + 2] * a.cos() + x[0, 0, 0, i] * a.sin())


def test_encoder_classifier_bidirectional_and_padding():
    cfg = load_run_config(data={"model": {"kind": "encoder_classifier", "vocab_size": V, "d_model": 16,
                                          "num_layers": 2, "d_ff": 32, "num_labels": 3,
                                          "moe": {"d_ff": 32, "num_experts": 4, "top_k": 2}}})
    m = cfg.model.build().double().eval()
    ids = torch.randint(V, (2, 6))
    out = m(ids)
    assert out.logits.shape == (2, 3)
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % V
    h1, h2 = m(ids).hidden_states, m(ids2).hidden_states
    assert not torch.allclose(h1[:, 0], h2[:, 0])  # the first token sees the last: bidirectional
    padded = torch.cat((ids, torch.zeros(2, 3, dtype=torch.long)), 1)
    mask = torch.cat((torch.ones(2, 6), torch.zeros(2, 3)), 1)
    torch.testing.assert_close(m(padded, attention_mask=mask).logits, out.logits, atol=1e-12, rtol=0)
    loss = torch.nn.functional.cross_entropy(m(ids).logits, torch.tensor([0, 2])) + m(ids).aux_loss
    loss.backward()
