"""Token mixers as attention kinds (models/mixers.py): pooling and SLAB linear attention against brute force,
the linear-time path against the quadratic definition, cached decoding, masks (padding and packing)."""

from __future__ import annotations

import pytest
import torch

from moesaic.models.cache import KVCache
from moesaic.models.mixers import (
    LinearAttention,
    LinearAttentionConfig,
    PoolConfig,
    PoolMixer,
    linear_attention_fast,
    linear_attention_reference,
)
from moesaic.train.packing import pack, unpack
from moesaic.train.run_config import load_run_config


@pytest.mark.parametrize("causal", [True, False])
def test_pool_equals_brute_force(causal: bool) -> None:
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    y = PoolMixer(PoolConfig(pool_size=3), 5, causal=causal)(x, torch.arange(7).expand(2, 7))
    for i in range(7):
        js = [j for j in range(7) if (i - 2 <= j <= i if causal else abs(i - j) <= 1)]
        torch.testing.assert_close(y[:, i], x[:, js].mean(1) - x[:, i])


@pytest.mark.parametrize("causal", [True, False])
def test_linear_time_path_equals_quadratic_definition(causal: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    allowed = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(9, 9, dtype=torch.bool).tril()
    torch.testing.assert_close(linear_attention_fast(q, k, v, causal, 1e-6),
                               linear_attention_reference(q, k, v, allowed, 1e-6))


@pytest.mark.parametrize("kind", ["pool", "linear"])
def test_cached_decoding_equals_full_forward(kind: str) -> None:
    torch.manual_seed(0)
    mixer = (PoolMixer(PoolConfig(), 16) if kind == "pool" else
             LinearAttention(LinearAttentionConfig(num_heads=2), 16)).double()
    if kind == "linear":
        torch.nn.init.normal_(mixer.dwc_weight_HdW)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    full = mixer(x, torch.arange(6).expand(2, 6))
    cache = KVCache()
    steps = [mixer(x[:, :3], torch.arange(3).expand(2, 3), cache=cache)]
    cache.advance(3)
    for t in range(3, 6):
        steps.append(mixer(x[:, t:t + 1], torch.full((2, 1), t), cache=cache))
        cache.advance(1)
    torch.testing.assert_close(torch.cat(steps, 1), full)


@pytest.mark.parametrize("kind", ["pool", "linear"])
def test_lm_generation_with_cache_and_packing(kind: str) -> None:
    model = load_run_config(data={"model": {
        "kind": "decoder_lm", "vocab_size": 40, "d_model": 16, "num_layers": 2, "d_ff": 32, "max_seq_len": 32,
        "attention": {"kind": kind, "num_heads": 2},
        "moe": {"d_ff": 16, "num_experts": 4, "top_k": 2}}}).model.build().eval()
    ids = torch.tensor([[3, 5, 7, 9]])
    with_cache = model.generate(ids, max_new_tokens=6, use_cache=True)
    without = model.generate(ids, max_new_tokens=6, use_cache=False)
    assert torch.equal(with_cache, without)
    seqs = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]
    with torch.no_grad():
        b = pack(seqs)
        packed = unpack(model(b["input_ids"], seq_ids=b["seq_ids"]).logits, b["seq_ids"])
        for s, got in zip(seqs, packed):
            torch.testing.assert_close(got, model(torch.tensor([s])).logits[0], atol=1e-6, rtol=0)


def test_masformer_recipe_mixes_spans_per_layer() -> None:
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "configs" / "zoo" / "masformer_lm.yaml"
    model = load_run_config(recipe, ["model.vocab_size=64"]).model.build()
    assert [layer.self_attn.cfg.sliding_window for layer in model.model.layers] == [None, 16, 16, None]
