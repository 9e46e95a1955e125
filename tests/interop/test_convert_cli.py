"""``moesaic convert hf-import`` / ``hf-export``: a hash-checked moesaic checkpoint in between, bit-exact
weights, tokenizer files carried along, bad input as one ``error:`` line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch

import moesaic
from moesaic.cli import main
from moesaic.interop.hf import from_hf

from .conftest import build_hf, transformers


def test_import_then_export_round_trip(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    src = tmp_path / "hf"
    ref = build_hf("qwen2_moe", src)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))

    assert main(["convert", "hf-import", str(src), str(tmp_path / "ckpt")]) == 0
    ckpt = tmp_path / "ckpt"
    step = ckpt / (ckpt / "LATEST").read_text().strip()
    assert {"config.yaml", "model.safetensors", "manifest.json", "tokenizer.json"} <= {p.name for p in step.iterdir()}
    loaded = moesaic.load(ckpt)
    ids = torch.randint(3, 96, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)

    assert main(["convert", "hf-export", str(ckpt), str(tmp_path / "out"), "--arch", "qwen2_moe"]) == 0
    out = tmp_path / "out"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    again = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    a, b = from_hf(src).state_dict(), from_hf(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 2
    capsys.readouterr()


def test_bad_input_is_one_error_line(tmp_path, capsys):
    src = tmp_path / "hf"
    build_hf("mixtral", src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    capsys.readouterr()
    assert main(["convert", "hf-import", str(src), str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unsupported model_type 'gpt_neox'")
    assert not (tmp_path / "ckpt").exists()

    assert main(["convert", "hf-export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint not found")


def test_export_of_a_trained_style_checkpoint_names_the_missing_feature(tmp_path, capsys):
    """A DeepSeekMoE-style model (ungated shared experts, plain attention) has no HF architecture."""
    from moesaic.core.config import dump_yaml
    from moesaic.train.checkpoint import gather_model_state, save_checkpoint

    data = {"model": {"kind": "decoder_lm", "vocab_size": 32, "d_model": 16, "num_layers": 2, "d_ff": 32,
                      "attention": {"num_heads": 2},
                      "moe": {"d_ff": 16, "num_experts": 4, "top_k": 2, "shared_experts": {"num": 1}}}}
    from moesaic.train.run_config import load_run_config

    model = load_run_config(data=data).model.build()
    save_checkpoint(tmp_path / "ckpt", 1, config_yaml=dump_yaml(data), model_state=gather_model_state(model))
    assert main(["convert", "hf-export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no supported Hugging Face architecture" in err[0] and "shared_experts" in err[0]
