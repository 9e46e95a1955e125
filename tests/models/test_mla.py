"""Multi-head Latent Attention as a decoder attention kind: the cache holds only the latent, cached and
uncached generation agree, padding changes nothing, and the math equals an explicit float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from moesaic.core.config import parse, validate_tree
from moesaic.models.cache import KVCache
from moesaic.models.decoder import DecoderLM, DecoderLMConfig

MLA = {"kind": "mla", "num_heads": 2, "q_lora_rank": 12, "kv_lora_rank": 8, "qk_nope_head_dim": 4,
       "qk_rope_head_dim": 4, "v_head_dim": 6}


def build(interleave: bool = True, q_lora: int | None = 12) -> DecoderLM:
    data = {"kind": "decoder_lm", "vocab_size": 50, "d_model": 16, "num_layers": 2, "d_ff": 32, "max_seq_len": 64,
            "attention": {**MLA, "rope_interleave": interleave, "q_lora_rank": q_lora},
            "moe": {"d_ff": 8, "num_experts": 4, "top_k": 2}}
    torch.manual_seed(0)
    return DecoderLM(validate_tree(parse(DecoderLMConfig, data, "model"), "model")).eval()


@pytest.mark.parametrize("interleave,q_lora", [(True, 12), (False, None)])
def test_cache_holds_the_latent_and_generation_matches(interleave, q_lora):
    model = build(interleave, q_lora)
    ids = torch.randint(0, 50, (2, 7))
    cache = KVCache()
    model(ids, past_key_values=cache)
    latent, k_rot = cache.layers[0]
    assert latent.shape == (2, 1, 7, 8) and k_rot.shape == (2, 1, 7, 4)  # kv_lora_rank + rope dims per token
    with_cache = model.generate(ids, max_new_tokens=10)
    without = model.generate(ids, max_new_tokens=10, use_cache=False)
    assert torch.equal(with_cache, without)


def test_padding_does_not_change_real_tokens():
    model = build()
    ids = torch.randint(1, 50, (1, 6))
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), ids), 1)
    mask = torch.cat((torch.zeros(1, 3), torch.ones(1, 6)), 1).long()
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 3:], model(ids).logits,
                                   atol=1e-5, rtol=0)


def test_matches_float64_reference():
    """softmax((q_nope k_nope + q_rope k_rope) / sqrt(d_nope + d_rope)) v, with k_rope shared by the heads."""
    model = build(interleave=False, q_lora=None).double()
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    pos = torch.arange(5)[None]
    with torch.no_grad():
        out = attn(x, pos)
        H, n, r, v = 2, 4, 4, 6
        q = attn.q_proj(x).view(1, 5, H, n + r)
        c, kr = attn.kv_a_proj_with_mqa(x).split([8, r], -1)
        kv = attn.kv_b_proj(attn.kv_a_layernorm(c)).view(1, 5, H, n + v)
        inv = 1.0 / (10000.0 ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
        ang = torch.arange(5, dtype=torch.float64)[:, None] * inv
        cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()

        def rot(t):
            a, b = t.chunk(2, -1)
            return t * cos[:, None] + torch.cat((-b, a), -1) * sin[:, None]

        ref = torch.zeros(1, 5, H, v, dtype=torch.float64)
        for h in range(H):
            qh = torch.cat((q[0, :, h, :n], rot(q[0, :, h, n:][:, None])[:, 0]), -1)
            kh = torch.cat((kv[0, :, h, :n], rot(kr[0][:, None])[:, 0]), -1)
            s = qh @ kh.t() / math.sqrt(n + r)
            s = s.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
            ref[0, :, h] = s.softmax(-1) @ kv[0, :, h, n:]
        ref = attn.o_proj(ref.reshape(1, 5, H * v))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_mla_config_rules():
    from moesaic.core.errors import ConfigError

    with pytest.raises(ConfigError, match="qk_rope_head_dim = 3: must be even"):
        validate_tree(parse(DecoderLMConfig, {"kind": "decoder_lm", "vocab_size": 8,
                                              "attention": {**MLA, "qk_rope_head_dim": 3}}, "model"), "model")
