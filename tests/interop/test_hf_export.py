"""to_hf: the closest architecture is chosen from the model's features, the export loads in transformers
without remote code and gives the same logits, and moesaic -> HF -> moesaic is bit-exact (square shapes
included, both expert layouts, sharded files)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moesaic.core.config import parse, validate_tree
from moesaic.core.errors import ConversionError
from moesaic.interop.hf import choose_arch, from_hf, to_hf
from moesaic.models.decoder import DecoderLM, DecoderLMConfig

from .conftest import ARCHS, ROPE, padded_batch, randomize, transformers


def native(moe: dict | None = None, attention: dict | None = None, seed: int = 0, **fields) -> DecoderLM:
    data = {"kind": "decoder_lm", "vocab_size": 96, "d_model": 16, "num_layers": 2, "d_ff": 32, "max_seq_len": 64,
            "attention": attention if (attention or {}).get("kind") == "mla" else
            {"kind": "mha", "num_heads": 4, "num_key_value_heads": 2, **(attention or {})},
            "moe": moe, **fields}
    torch.manual_seed(seed)
    model = DecoderLM(validate_tree(parse(DecoderLMConfig, data, "model"), "model"))
    with torch.no_grad():
        randomize(model, seed)
        for name, b in model.named_buffers():
            if name.endswith("step_load"):
                b.zero_()
    return model.eval()


def same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def hf_logits_match(model, folder) -> None:
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    ids, mask = padded_batch()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, position_ids=pos).logits
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)


#: Mistral without a sliding window is a Llama; the variants keep their architecture.
EXPORTED_AS = {"deepseek_v3_plain": "deepseek_v3", "deepseek_v3_yarn": "deepseek_v3", "llama_rope_llama3": "llama",
               "mistral_rope_linear": "llama"}


@pytest.mark.parametrize("name", ARCHS + ROPE)
def test_round_trip_every_architecture(name, hf_models, tmp_path):
    folder, _ = hf_models(name)
    m1 = from_hf(folder)
    for xl in ("per_expert", "fused"):
        out = tmp_path / xl
        to_hf(m1, out, expert_layout=xl)
        assert json.loads((out / "config.json").read_text())["model_type"] == EXPORTED_AS.get(name, name)
        m2 = from_hf(out)
        assert m2.cfg == m1.cfg
        same_state(m1, m2)
    hf_logits_match(m1, tmp_path / "fused")


SQUARE = {"I == H": 16, "I == 2H": 32, "2I == H": 8}  # expert width I, hidden size H = 16


@pytest.mark.parametrize("trap", list(SQUARE))
def test_square_shape_traps_round_trip_bit_exact(trap, tmp_path):
    """Shapes where a transposition or a gate/up swap is invisible: I == H (every expert matrix square),
    2I == H (fused gate_up [2I, H] square) and I == 2H (transformers #47031, TransformerLens #1668)."""
    F = SQUARE[trap]
    model = native(moe={"d_ff": F, "num_experts": 4, "top_k": 2}, d_ff=F)
    assert choose_arch(model.cfg).name == "mixtral"
    to_hf(model, tmp_path / "hf")
    hf_logits_match(model, tmp_path / "hf")
    same_state(model, from_hf(tmp_path / "hf"))
    # a checkpoint with gate and up swapped for one expert has the same shapes: only the logits show it
    f = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(f))
    a, b = "model.layers.0.block_sparse_moe.experts.1.w1.weight", "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    state[a], state[b] = state[b], state[a]
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(AssertionError):
        hf_logits_match(model, tmp_path / "hf")
    swapped = from_hf(tmp_path / "hf")
    w_up = swapped.model.layers[0].mlp.experts.w_up_EHD[1]
    assert torch.equal(w_up[:F], model.model.layers[0].mlp.experts.w_up_EHD[1][F:])


@pytest.mark.parametrize("features,arch", [
    ({"moe": {"d_ff": 16, "num_experts": 4, "top_k": 2}}, "mixtral"),
    ({"moe": {"d_ff": 16, "num_experts": 4, "top_k": 2, "router": {"kind": "topk", "normalization": "none"}},
      "attention": {"qk_norm": True}}, "qwen3_moe"),
    ({"moe": {"d_ff": 16, "num_experts": 4, "top_k": 2, "shared_experts": {"num": 1, "gate": "sigmoid"}},
      "attention": {"bias": True}}, "qwen2_moe"),
    ({"moe": {"d_ff": 16, "num_experts": 4, "top_k": 2}, "attention": {"qk_norm": True}}, "qwen3_moe"),
    ({"moe": {"d_ff": 16, "num_experts": 4, "top_k": 2}, "attention": {"qk_norm": True, "bias": True, "o_bias": True},
      "first_k_dense": 1}, "qwen3_moe"),
    ({"moe": {"d_ff": 16, "num_experts": 4, "top_k": 2},
      "attention": {"qk_norm": True, "qk_norm_scope": "projection"}}, "olmoe"),
    ({"moe": {"d_ff": 8, "num_experts": 8, "top_k": 2, "shared_experts": {"num": 1},
              "router": {"kind": "topk", "score_func": "sigmoid", "expert_bias": True, "n_groups": 2,
                         "topk_groups": 1, "routed_scaling_factor": 2.0}},
      "attention": {"kind": "mla", "num_heads": 2, "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4,
                    "v_head_dim": 4}, "first_k_dense": 1}, "deepseek_v3"),
    ({}, "llama"),
    ({"attention": {"sliding_window": 4}}, "mistral"),
    ({"attention": {"bias": True}}, "qwen2"),
])
def test_closest_architecture_is_chosen_and_exact(features, arch, tmp_path):
    model = native(**features)
    assert choose_arch(model.cfg).name == arch
    to_hf(model, tmp_path / "hf")
    hf_logits_match(model, tmp_path / "hf")
    back = from_hf(tmp_path / "hf")
    same_state(model, back)


@pytest.mark.parametrize("features,needle", [
    ({"moe": {"d_ff": 16, "num_experts": 4, "top_k": 2, "router": {"kind": "gshard"}}}, "router.kind"),
    ({"moe": {"d_ff": 16, "num_experts": 4, "top_k": 2, "shared_experts": {"num": 1}}}, "shared_experts"),
    ({"moe": {"d_ff": 16, "num_experts": 4, "top_k": 2, "router": {"kind": "topk", "score_func": "sigmoid"}}},
     "score_func"),
    ({"moe": {"d_ff": 16, "num_experts": 4, "top_k": 2, "router": {"kind": "topk", "normalization": "none"}}},
     "normalization"),
])
def test_export_refuses_features_no_architecture_has(features, needle, tmp_path):
    model = native(**features)
    with pytest.raises(ConversionError, match="no supported Hugging Face architecture") as err:
        to_hf(model, tmp_path / "hf")
    assert needle in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_export_to_named_architecture_names_the_missing_feature(tmp_path):
    model = native(moe={"d_ff": 16, "num_experts": 4, "top_k": 2, "shared_experts": {"num": 1, "gate": "sigmoid"}})
    with pytest.raises(ConversionError, match="mixtral.*shared_experts"):
        to_hf(model, tmp_path / "hf", arch="mixtral")
    with pytest.raises(ConversionError, match="unknown architecture 'gpt2'"):
        to_hf(model, tmp_path / "hf", arch="gpt2")


def test_sharded_export_loads_everywhere(tmp_path):
    model = native(moe={"d_ff": 16, "num_experts": 4, "top_k": 2}, tie_word_embeddings=True)
    to_hf(model, tmp_path / "hf", max_shard_bytes=8192, expert_layout="fused")
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf_logits_match(model, tmp_path / "hf")
    back = from_hf(tmp_path / "hf")
    same_state(model, back)
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_tokenizer_files_travel(hf_models, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    folder, _ = hf_models("llama")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    model = from_hf(folder)
    to_hf(model, tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (folder / name).read_bytes()
