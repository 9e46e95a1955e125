"""``moesaic convert VERB IN... OUT``: a real Hugging Face Llama folder upcycled through the CLI equals the
transformers model at step 0 (1e-5); moesaic checkpoints in and out; OUT is written atomically, refused when
someone else's, replaced when ours; bad input is one ``error:`` line with exit 2 and no OUT."""

from __future__ import annotations

import json

import pytest
import torch

import moesaic
from moesaic.cli import main
from moesaic.models.decoder import DecoderLM, DecoderLMConfig
from moesaic.moe.layer import MoELayer
from moesaic.transforms.convert_io import save_converted
from upcycle_fixtures import hf_llama

transformers = pytest.importorskip("transformers")


def test_hf_llama_upcycled_by_the_cli_equals_the_dense_model(tmp_path, capsys) -> None:
    ref = hf_llama(tmp_path / "llama")
    out = tmp_path / "moe"
    assert main(["convert", "upcycle", str(tmp_path / "llama"), str(out)]) == 0
    assert "upcycle" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["LATEST", "step-00000000"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    prov = json.loads((out / "step-00000000" / "convert.json").read_text())
    assert prov["verb"] == "upcycle" and prov["config"]["num_experts"] == 8
    moe = moesaic.load(out)
    assert sum(isinstance(m, MoELayer) for m in moe.modules()) == 2
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    # ours: converting again into the same OUT replaces it (with other settings)
    assert main(["convert", "upcycle", str(tmp_path / "llama"), str(out), "--set", "num_experts=4"]) == 0
    assert moesaic.load(out).model.layers[0].mlp.num_experts == 4


def test_moesaic_checkpoints_in_and_multiplet_inputs(tmp_path) -> None:
    cfg = DecoderLMConfig(vocab_size=40, d_model=16, d_ff=32, num_layers=2)
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_converted(DecoderLM(cfg), tmp_path / f"dense{seed}", {})
    out = tmp_path / "multi"
    assert main(["convert", "upcycle", str(tmp_path / "dense0"), str(tmp_path / "dense1"), str(out),
                 "--set", "num_experts=4", "--set", "top_k=1", "--set", "normalization=none",
                 "--set", "drop_fraction=0.25"]) == 0
    m = moesaic.load(out)
    assert m.model.layers[1].mlp.num_experts == 4 and m.model.layers[1].mlp.top_k == 1


def test_refusals_leave_no_output_folder(tmp_path, capsys) -> None:
    hf_llama(tmp_path / "llama")
    capsys.readouterr()
    src = str(tmp_path / "llama")
    cases = [
        (["convert", "upcycle", src, src, src, str(tmp_path / "o1"), "--set", "num_experts=8"], "not divisible"),
        (["convert", "upcycle", str(tmp_path / "missing"), str(tmp_path / "o2")], "not found"),
        (["convert", "upcycle", src, str(tmp_path / "o3"), "--set", "granularity=5"], "does not divide"),
        (["convert", "upcycle", src, str(tmp_path / "o4"), "--set", "bogus=1"], "bogus"),
        (["convert", "upcycle", str(tmp_path / "o5")], "IN... OUT"),
    ]
    for argv, why in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and why in err, err
        assert not (tmp_path / argv[-1]).exists() and not (tmp_path / argv[-3]).name.startswith(".")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    assert main(["convert", "upcycle", src, str(theirs)]) == 2
    assert "no moesaic convert wrote" in capsys.readouterr().err
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]


def test_converters_are_listed(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "converters:" in out and "upcycle" in out.split("converters:")[1]
