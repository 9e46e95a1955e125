"""from_hf: moesaic logits equal transformers' eager logits (fp32, 1e-5) with and without padding, and
20 greedy tokens generated with the KV cache are identical, for every supported architecture."""

from __future__ import annotations

import pytest
import torch

from moesaic.interop.hf import from_hf

from .conftest import ARCHS, ROPE, padded_batch


@pytest.mark.parametrize("name", ARCHS + ROPE)
def test_logits_match_transformers(name, hf_models):
    folder, ref = hf_models(name)
    model = from_hf(folder)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = ref(ids[1:]).logits
        got = model(ids[1:]).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # padded batch: transformers gets the same position ids (real tokens count from 0)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        want = ref(ids, attention_mask=mask, position_ids=pos).logits
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=0)
    assert got[valid].abs().max() > 0.1  # a real signal, not two zero tensors
    # the padded row equals the same prompt alone (padding changes nothing)
    with torch.no_grad():
        alone = model(ids[:1, 3:]).logits
    torch.testing.assert_close(got[0, 3:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ARCHS)
def test_greedy_generation_with_kv_cache(name, hf_models):
    folder, ref = hf_models(name)
    model = from_hf(folder)
    ids, mask = padded_batch(seed=2)
    want = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, min_new_tokens=20,
                        pad_token_id=0, eos_token_id=None)
    got = model.generate(ids, max_new_tokens=20, attention_mask=mask)
    assert got.shape == (2, 29)
    assert torch.equal(got, want), f"{name}: moesaic {got[:, 9:].tolist()} != transformers {want[:, 9:].tolist()}"


@pytest.mark.parametrize("name", ["qwen3_moe", "llama"])
def test_import_from_loaded_model(name, hf_models):
    """A PreTrainedModel object (fused layout in memory; Llama with tied embeddings) imports like its folder."""
    folder, ref = hf_models(name)
    a, b = from_hf(ref), from_hf(folder)
    if name == "qwen3_moe":
        assert a.hf_info["layout"].endswith("(fused experts)") and b.hf_info["layout"].endswith("(per_expert experts)")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_mapping_is_exact_for_deepseek_router(hf_models):
    """Sigmoid scores + correction bias + group limit + routed scaling: the selected experts and weights
    of every token equal transformers' router."""
    folder, ref = hf_models("deepseek_v3")
    model = from_hf(folder)
    x = torch.randn(40, 16)
    hf_gate = ref.model.layers[1].mlp.gate
    assert hf_gate.e_score_correction_bias.abs().min() > 0  # non-zero biases
    _, w_ref, ids_ref = hf_gate(x)
    d = model.model.layers[1].mlp.router(x)
    ids, w = d.to_topk()
    order_ref, order = ids_ref.sort(-1), ids.sort(-1)
    assert torch.equal(order_ref.values, order.values)
    torch.testing.assert_close(w.gather(1, order.indices), w_ref.gather(1, order_ref.indices), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ROPE)
def test_rope_scaling_matches_at_long_positions(name, hf_models):
    """Positions past original_max_position_embeddings, where the scaled frequencies matter."""
    folder, ref = hf_models(name)
    model = from_hf(folder)
    assert model.cfg.attention.rope_scaling is not None
    ids = torch.randint(3, 96, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
