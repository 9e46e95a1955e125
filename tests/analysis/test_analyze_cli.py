"""`moesaic analyze`: reports for a trained checkpoint and an imported Hugging Face Mixtral, with and without
--compare; bad input exits 2 with one line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moesaic.cli import main

from .conftest import hf_folder


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_reports(trained_ckpt: Path, hf_mixtral: tuple[Path, Path], tiny_config: Path, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    a, b = hf_mixtral
    assert main(["analyze", str(trained_ckpt), "--data", str(tiny_config), "--out", str(tmp_path / "r1"),
                 "--passages", "16", "--ranks", "2"]) == 0
    s1 = json.loads((tmp_path / "r1" / "stats.json").read_text())
    assert s1["actions"]["placement"]["ranks"] == 2 and "cost" in s1 and "compare" not in s1
    for c in s1["cost"].values():
        assert c["measured_s"] > 0 and 0 < c["intensity"] and c["flops"] > 0
    assert main(["analyze", str(a), "--data", str(tiny_config), "--out", str(tmp_path / "r2"), "--compare", str(b),
                 "--passages", "16", "--no-timing"]) == 0
    s2 = json.loads((tmp_path / "r2" / "stats.json").read_text())
    assert len(s2["layers"]) == 3 and len(s2["compare"]["layers"]) == 3 and "cost" not in s2
    assert s2["layers"] != s2["compare"]["layers"]  # different weights route differently
    assert (tmp_path / "r2" / "compare_load_difference.png").is_file()


def test_cli_bad_inputs(trained_ckpt: Path, tiny_config: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    dense = hf_folder(tmp_path / "llama", "llama", 0)
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["analyze", str(dense), "--data", str(tiny_config), "--out", str(tmp_path / "x")]) == 2
    assert "has no MoE layers" in _err(capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    assert main(["analyze", str(trained_ckpt), "--data", str(empty), "--out", str(tmp_path / "x")]) == 2
    assert "holds no text" in _err(capsys)
    (tmp_path / "exists").mkdir()
    assert main(["analyze", str(trained_ckpt), "--data", str(tiny_config), "--out", str(tmp_path / "exists")]) == 2
    assert "already exists" in _err(capsys)
    toy = tmp_path / "toy.yaml"
    toy.write_text("data: {kind: toy_regression}\n")
    assert main(["analyze", str(trained_ckpt), "--data", str(toy), "--out", str(tmp_path / "x")]) == 2
    assert "analyze reads text data" in _err(capsys)
    assert main(["analyze", str(trained_ckpt), "--data", str(tmp_path / "nope.txt"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "no such file" in _err(capsys)
    assert main(["analyze", str(tmp_path / "none"), "--data", str(tiny_config), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in _err(capsys)
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
