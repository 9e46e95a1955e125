"""``python -m moesaic.examples.demo --out DIR`` deletes only what an earlier demo run wrote in DIR (issue 20:
it used to ``shutil.rmtree(DIR)`` whatever DIR held). Real folders, a real demo process and real demo runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moesaic.core.errors import ConfigError
from moesaic.examples.demo import main as demo
from moesaic.examples.demo_output import MARKER, prepare_demo_folder

REPO = Path(__file__).resolve().parents[2]
SHORT = [x for kv in ("model.max_seq_len=96", "train.max_steps=2", "train.eval_every=2", "train.save_every=2")
         for x in ("--set", kv)]


def test_a_user_folder_survives_and_the_demo_exits_2_with_one_line(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "moe").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (work / "moe" / "thesis.tex").write_text("also mine")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "moesaic.examples.demo", str(REPO / "configs" / "demo.yaml"),
                        "--out", str(work)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --out = {str(work)!r}: is a non-empty folder"), p.stderr
    assert (work / "notes.txt").read_text() == "mine" and (work / "moe" / "thesis.tex").read_text() == "also mine"
    assert sorted(p.name for p in work.iterdir()) == ["moe", "notes.txt"]


def test_a_folder_of_an_earlier_demo_run_is_reused(tiny_config: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert demo([str(tiny_config), "--out", str(out), *SHORT]) == 0
    assert (out / MARKER).is_file() and (out / "moe" / "LATEST").is_file() and (out / "dense" / "LATEST").is_file()
    (out / "moe" / "stale.txt").write_text("from the first run")
    (out / "README.txt").write_text("the user's note beside the runs")
    capsys.readouterr()
    assert demo([str(tiny_config), "--out", str(out), *SHORT]) == 0
    assert "MoE - dense val loss" in capsys.readouterr().out
    assert not (out / "moe" / "stale.txt").exists()  # moe/ was rewritten from scratch
    assert (out / "moe" / "LATEST").read_text().strip() == "step-00000002"
    assert (out / "README.txt").read_text() == "the user's note beside the runs"


def test_folders_the_demo_may_and_may_not_use(tmp_path: Path) -> None:
    new = tmp_path / "a" / "b"
    prepare_demo_folder(new)
    assert [p.name for p in new.iterdir()] == [MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_demo_folder(empty)
    assert (empty / MARKER).is_file()
    # a demo run from before the marker: only moe/ and dense/, each with the trainer's metrics.jsonl
    old = tmp_path / "old"
    for name in ("moe", "dense"):
        (old / name / "step-00000002").mkdir(parents=True)
        (old / name / "metrics.jsonl").write_text("{}\n")
    prepare_demo_folder(old)
    assert sorted(p.name for p in old.iterdir()) == [MARKER]
    # a moe/ folder that is not a trainer run, a file, a symlinked run folder: refused, nothing deleted
    lookalike = tmp_path / "lookalike"
    (lookalike / "moe").mkdir(parents=True)
    (lookalike / "moe" / "data.csv").write_text("1,2\n")
    file = tmp_path / "file.txt"
    file.write_text("x")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / MARKER).write_text("")
    (linked / "moe").symlink_to(lookalike / "moe")
    for bad, rule in ((lookalike, "non-empty folder"), (file, "is not a folder"), (linked, "moe is not a folder")):
        with pytest.raises(ConfigError, match=rule):
            prepare_demo_folder(bad)
    assert (lookalike / "moe" / "data.csv").read_text() == "1,2\n" and file.read_text() == "x"
