"""The decode fast path outside the MoE layer is bit-identical to the readable reference: RoPE rotated with a
roll and a signed sine (``rope.rotate``) equals ``apply_rotary``; the angles computed once per forward
(``RotaryAngles``) equal every layer's own; multi-head attention and the whole body give the same bits with
and without the shared angles; RMSNorm without its no-op cast equals the formula."""

import pytest
import torch
import torch.nn.functional as F

from moesaic.core.config import parse, validate_tree
from moesaic.inference.kv_cache import StaticKVCache
from moesaic.models.attention import MHAConfig, MultiHeadAttention, repeat_kv
from moesaic.models.cache import KVCache
from moesaic.models.decoder import DecoderLM, DecoderLMConfig
from moesaic.models.masks import sliding_window_mask
from moesaic.models.norms import RMSNorm
from moesaic.models.rope import RotaryAngles, RotaryEmbedding, apply_rotary, rotate
from moesaic.models.rope_scaling import RopeScalingConfig

YARN = RopeScalingConfig(type="yarn", factor=4.0, original_max_position_embeddings=64)
LLAMA3 = RopeScalingConfig(type="llama3", factor=8.0, original_max_position_embeddings=64)


@pytest.mark.parametrize("dim,theta,scaling", [(64, 1e6, None), (8, 1e4, YARN), (128, 5e5, LLAMA3), (6, 10.0, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rotate_and_shared_angles_equal_apply_rotary_at_every_position(dim, theta, scaling, dtype):
    torch.manual_seed(0)
    emb = RotaryEmbedding(dim, theta, scaling)
    for pos_BS in (torch.arange(4096)[None], torch.tensor([[4095]]), torch.tensor([[0, 5, 9], [3, 3, 200]])):
        B, S = pos_BS.shape
        x_BSHd = (torch.randn(B, S, 3, dim, dtype=torch.float64) * 50).to(dtype)
        cos, sin = emb(pos_BS, dtype)
        want = apply_rotary(x_BSHd.transpose(1, 2), cos, sin)
        angles = RotaryAngles(pos_BS)
        c2, s2 = angles.cos_sin(emb, dtype)
        assert torch.equal(c2, cos) and torch.equal(s2, sin)
        got = rotate(x_BSHd, *angles.rotation(emb, dtype)).transpose(1, 2)
        assert torch.equal(got, want)
        assert angles.rotation(emb, dtype)[0] is angles.rotation(emb, dtype)[0]  # computed once


def test_angles_are_shared_by_equal_configs_only():
    pos = torch.arange(7)[None]
    angles = RotaryAngles(pos)
    a, b, c = RotaryEmbedding(16, 1e4), RotaryEmbedding(16, 1e4), RotaryEmbedding(16, 5e3)
    assert angles.cos_sin(a, torch.float32)[0] is angles.cos_sin(b, torch.float32)[0]
    assert torch.equal(angles.cos_sin(c, torch.float32)[0], c(pos, torch.float32)[0])
    assert not torch.equal(angles.cos_sin(c, torch.float32)[0], a(pos, torch.float32)[0])
    b.to(torch.bfloat16)  # inv_freq rounded to bf16: other angles, not shared with a's
    assert torch.equal(angles.cos_sin(b, torch.float32)[0], b(pos, torch.float32)[0])
    assert not torch.equal(angles.cos_sin(b, torch.float32)[0], a(pos, torch.float32)[0])


def reference_mha(attn: MultiHeadAttention, x_BSD, pos_BS, mask_B1QK, cache):
    """The multi-head attention forward before the shared angles (transpose, rotary_emb, apply_rotary)."""
    cfg = attn.cfg
    B, S, _ = x_BSD.shape
    H, Hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k = attn.q_proj(x_BSD), attn.k_proj(x_BSD)
    if cfg.qk_norm and cfg.qk_norm_scope == "projection":
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.view(B, S, H, d), k.view(B, S, Hkv, d), attn.v_proj(x_BSD).view(B, S, Hkv, d)
    if cfg.qk_norm and cfg.qk_norm_scope == "head":
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = attn.rotary_emb(pos_BS, q.dtype)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if cache is not None:
        k, v = cache.update(attn.layer_idx, k, v)
    k, v = repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv)
    if cfg.sliding_window is not None:
        mask_B1QK = sliding_window_mask(mask_B1QK, S, k.shape[2], cfg.sliding_window, True, x_BSD.device)
    is_causal = mask_B1QK is None and k.shape[2] == S and S > 1
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1QK, is_causal=is_causal)
    return attn.o_proj(o.transpose(1, 2).reshape(B, S, H * d))


@pytest.mark.parametrize("kw", [{}, {"num_key_value_heads": 2}, {"qk_norm": True},
                                {"qk_norm": True, "qk_norm_scope": "projection", "bias": True},
                                {"sliding_window": 3, "num_key_value_heads": 1}])
def test_mha_equals_reference_prefill_and_decode(kw):
    torch.manual_seed(0)
    attn = MultiHeadAttention(MHAConfig(num_heads=4, **kw), 32).eval()
    B, P = 2, 6
    x = torch.randn(B, P + 3, 32)
    with torch.no_grad():
        pos = torch.arange(P)[None].expand(B, P)
        assert torch.equal(attn(x[:, :P], pos), reference_mha(attn, x[:, :P], pos, None, None))
        assert torch.equal(attn(x[:, :P], pos, rope=RotaryAngles(pos)), reference_mha(attn, x[:, :P], pos, None, None))
        # decode: the concatenating KVCache and the static cache, one token at a time
        c_ref, c_new, static = KVCache(), KVCache(), StaticKVCache(B, 16)
        view = static.view(slice(0, B), 0, 0)
        for a, b in ((0, P), (P, P + 1), (P + 1, P + 2), (P + 2, P + 3)):
            pos = torch.arange(a, b)[None].expand(B, b - a)
            want = reference_mha(attn, x[:, a:b], pos, None, c_ref)
            assert torch.equal(attn(x[:, a:b], pos, None, c_new, rope=RotaryAngles(pos)), want)
            assert torch.equal(attn(x[:, a:b], pos, None, view), want)
            for c in (c_ref, c_new, view):
                c.advance(b - a)


def test_body_computes_angles_once_and_equals_per_layer_angles(monkeypatch):
    torch.manual_seed(0)
    data = {"vocab_size": 32, "d_model": 16, "num_layers": 3, "d_ff": 32, "max_seq_len": 48,
            "attention": {"num_heads": 2}, "moe": {"d_ff": 32, "num_experts": 4, "top_k": 2},
            "layer_overrides": [{"layers": [2], "attention": {"kind": "mla", "num_heads": 2,
                                                              "qk_rope_head_dim": 8, "rope_theta": 500.0}}]}
    m = DecoderLM(validate_tree(parse(DecoderLMConfig, data, "model"), "model")).eval()
    ids = torch.randint(0, 32, (2, 9))
    calls = []
    orig = RotaryEmbedding.angles
    monkeypatch.setattr(RotaryEmbedding, "angles", lambda self, p: calls.append(self.key) or orig(self, p))
    with torch.no_grad():
        got = m(ids).logits
        assert len(calls) == 2  # one per rotary configuration (MHA layers 0-1, MLA layer 2), not per layer
        body = m.model
        h = body.embed_tokens(ids)
        pos = torch.arange(9)[None].expand(2, 9)
        for layer in body.layers:  # every layer computing its own angles: the path before sharing
            h = layer(h, pos, None, None, None, ids)
        assert len(calls) == 5
        assert torch.equal(got, m.lm_head(body.norm(h)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_rmsnorm_equals_formula(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(24, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24))
    x = (torch.randn(5, 24) * 3).to(dtype)
    h = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    want = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert torch.equal(norm(x), want)


def test_angles_stay_fp32_under_autocast():
    emb = RotaryEmbedding(16, 1e4)
    pos = torch.arange(300)[None]
    want = emb.angles(pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = RotaryAngles(pos).cos_sin(emb, torch.float32)
    assert got[0].dtype == torch.float32 and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
