"""``to_hf`` / ``moesaic convert hf-export`` and ``hf-import`` never overwrite a folder they did not write:
exporting over a downloaded model's folder (or a user's folder) and importing into a training run's folder
are refused before anything is written; an earlier export or import is replaced."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from moesaic.cli import main
from moesaic.core.errors import ConversionError
from moesaic.interop.hf import from_hf, to_hf

from .conftest import build_hf


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_refuses_foreign_folders_and_replaces_its_own(tmp_path: Path) -> None:
    src = tmp_path / "hf"
    build_hf("qwen2_moe", src)
    model = from_hf(src)
    before = _digest(src)
    with pytest.raises(ConversionError, match=f"{src}: a non-empty folder that no moesaic export wrote"):
        to_hf(model, src)  # over the model it came from
    assert _digest(src) == before
    user = tmp_path / "work"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="no moesaic export wrote"):
        to_hf(model, user)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    with pytest.raises(ConversionError, match="is a file"):
        to_hf(model, user / "notes.txt")
    out = tmp_path / "out"
    to_hf(model, out)
    to_hf(model, out, expert_layout="fused")  # an earlier export is replaced
    assert from_hf(out).cfg == model.cfg


def test_cli_export_and_import_refuse_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "hf"
    build_hf("mixtral", src)
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "hf-import", str(src), str(ckpt)]) == 0
    assert main(["convert", "hf-import", str(src), str(ckpt)]) == 0  # an earlier import is replaced
    before = _digest(src)
    capsys.readouterr()
    assert main(["convert", "hf-export", str(ckpt), str(src)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {src}: a non-empty folder"), err
    assert _digest(src) == before
    run = tmp_path / "run"
    (run / "step-00000040").mkdir(parents=True)
    (run / "LATEST").write_text("step-00000040\n")
    (run / "metrics.jsonl").write_text("{}\n")
    assert main(["convert", "hf-import", str(src), str(run)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: OUT_CKPT = {str(run)!r}: is a non-empty folder"), err
    assert (run / "LATEST").read_text() == "step-00000040\n" and not (run / "step-00000000").exists()
