"""Bad Hugging Face inputs give typed errors that name the keys, fields or files (docs/hf.md, Safety
rules): unsupported architectures, mismatched configs, missing shards, transposed weights, tensors
neither used nor ignored, undeclared layouts, pickle-only folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moesaic.core.errors import ConversionError, MoesaicError
from moesaic.interop.hf import from_hf

from .conftest import build_hf


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixtral_src")
    build_hf("mixtral", folder)
    return folder


@pytest.fixture
def copy_of(mixtral_dir, tmp_path):
    def make(name: str = "m"):
        dst = tmp_path / name
        shutil.copytree(mixtral_dir, dst)
        return dst
    return make


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def edit_weights(folder, fn, metadata=None):
    f = folder / "model.safetensors"
    state = load_file(str(f))
    fn(state)
    save_file(state, str(f), metadata={"format": "pt", **(metadata or {})})


def test_error_type_is_a_moesaic_error():
    assert issubclass(ConversionError, MoesaicError) and issubclass(ConversionError, ValueError)


def test_unsupported_architecture(copy_of):
    d = copy_of()
    edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConversionError, match="unsupported model_type 'gpt2'; supported: .*mixtral"):
        from_hf(d)


@pytest.mark.parametrize("changes,pattern", [
    ({"hidden_size": 32}, r"shape mismatch .*model\.embed_tokens\.weight \[96, 16\] -> .*expected \[96, 32\]"),
    ({"intermediate_size": 16}, r"shape mismatch .*block_sparse_moe\.experts"),
    ({"num_local_experts": 3}, r"neither used nor ignored .*experts\.3\."),
    ({"num_hidden_layers": 3}, r"missing tensors .*model\.layers\.2\."),
    ({"num_hidden_layers": 1}, r"neither used nor ignored .*model\.layers\.1\."),
    ({"vocab_size": 95}, r"lm_head\.weight \[96, 16\] -> lm_head\.weight got \[96, 16\], expected \[95, 16\]"),
    ({"tie_word_embeddings": True}, r"neither used nor ignored .*lm_head\.weight"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
     r"rope_type = 'dynamic' is not supported"),
    ({"router_jitter_noise": 0.1}, r"router_jitter_noise = 0\.1 is not supported"),
    ({"hidden_act": "tanh"}, r"hidden_act = 'tanh' is not supported"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                              "activation_scheme": "dynamic"}}, r"quantized checkpoint .*'fp8'"),
])
def test_mismatched_config(copy_of, changes, pattern):
    d = copy_of()
    edit_config(d, **changes)
    with pytest.raises(ConversionError, match=pattern):
        from_hf(d)


def test_missing_shard_lists_the_lost_keys(tmp_path):
    model = build_hf("olmoe", tmp_path / "src", max_shard_size="20KB")
    del model
    index = json.loads((tmp_path / "src" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    (tmp_path / "src" / shards[-1]).unlink()
    with pytest.raises(ConversionError, match=f"missing shard\\(s\\) {shards[-1]}; \\d+ tensors cannot be loaded: "):
        from_hf(tmp_path / "src")


def test_sharded_import_loads_completely(tmp_path):
    ref = build_hf("olmoe", tmp_path / "src", max_shard_size="20KB")
    model = from_hf(tmp_path / "src")
    ids = torch.randint(3, 96, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_transposed_weight_non_square(copy_of):
    d = copy_of()
    key = "model.layers.1.block_sparse_moe.experts.2.w2.weight"  # [16, 24]
    edit_weights(d, lambda s: s.__setitem__(key, s[key].t().contiguous()))
    with pytest.raises(ConversionError, match=r"shape mismatch .*experts\.w_down_EDF"):
        from_hf(d)


def test_transposed_square_weight_is_caught_by_the_layout_tag(tmp_path):
    """I == H: a transposed expert matrix keeps its shape; the declared orientation tag catches it."""
    from moesaic.interop.hf import to_hf

    src = tmp_path / "src"
    build_hf("qwen3_moe", src)  # moe_intermediate_size == hidden_size == 16
    out = tmp_path / "out"
    to_hf(from_hf(src), out)
    key = "model.layers.1.mlp.experts.0.down_proj.weight"
    edit_weights(out, lambda s: s.__setitem__(key, s[key].t().contiguous()),
                 metadata={"moesaic.weight_layout": "in,out"})
    with pytest.raises(ConversionError, match=r"weight layout tag is not 'out,in'.*moesaic\.weight_layout=in,out"):
        from_hf(out)


def test_extra_and_missing_tensors_are_listed(copy_of):
    d = copy_of()

    def change(s):
        s["model.layers.0.block_sparse_moe.extra.weight"] = torch.zeros(2)
        del s["model.layers.1.self_attn.k_proj.weight"]

    edit_weights(d, change)
    with pytest.raises(ConversionError) as err:
        from_hf(d)
    msg = str(err.value)
    assert "missing tensors (1): model.layers.1.self_attn.k_proj.weight" in msg
    assert "neither used nor ignored (1): model.layers.0.block_sparse_moe.extra.weight" in msg
    assert "model tensors never written (1): model.layers.1.self_attn.k_proj.weight" in msg


def test_ignored_tensors_are_declared_not_guessed(copy_of):
    d = copy_of()
    edit_weights(d, lambda s: s.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(2)))
    from_hf(d)  # declared as ignored (recomputed from rope_theta)


def test_expert_layout_must_match_the_declared_one(copy_of):
    d = copy_of()
    with pytest.raises(ConversionError, match=r"missing tensors .*mlp\.experts\.gate_up_proj"):
        from_hf(d, expert_layout="fused")
    with pytest.raises(ConversionError, match="expert_layout = 'legacy'"):
        from_hf(d, expert_layout="legacy")


def test_unsupported_config_features_are_named(tmp_path):
    build_hf("olmoe", tmp_path / "o")
    edit_config(tmp_path / "o", clip_qkv=8.0)
    with pytest.raises(ConversionError, match=r"olmoe: config field clip_qkv = 8\.0 is not supported"):
        from_hf(tmp_path / "o")


def test_not_a_model_folder(tmp_path, copy_of):
    with pytest.raises(ConversionError, match="no config.json"):
        from_hf(tmp_path)
    d = copy_of()
    torch.save({}, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"only pickle weights found \(pytorch_model\.bin\)"):
        from_hf(d)
    (d / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ConversionError, match="not a readable safetensors file"):
        from_hf(d)
