"""An empty or cut-short config file is an error for ``moesaic check`` and ``moesaic train``: exit 2 and one
line ``error: FILE: ...`` (issue 12, defect 4: an empty file used to run the toy regression defaults).

Real files, real ``python -m moesaic`` processes (started together, so their torch imports overlap).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moesaic.cli._config_file import load_run_config_file
from moesaic.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


TEXT = DEMO.read_bytes()
# (file content, what the error line must say besides the file name)
CASES: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "is empty"),
    "blank": (b"\n  \n\n", "is empty"),
    "comments": (b"# a config to be written\n# model: ...\n", "is empty"),
    "empty_mapping": (b"{}\n", "is empty"),
    "only_model": (b"model:\n  kind: moe_regression\n", "no data / train section"),
    "cut_mid_key": (TEXT[: TEXT.index(b"num_experts") + 5], "invalid YAML"),
    "cut_mid_value": (TEXT[: TEXT.index(b"kind: shakespeare") + 8], "no train section"),
    "cut_at_line": (TEXT[: TEXT.index(b"\ntrain:") + 1], "no train section"),
}


def test_empty_and_cut_configs_exit_2_with_one_line(tmp_path: Path) -> None:
    files = {}
    for name, (text, _) in CASES.items():
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_bytes(text)
    argvs = {f"check-{n}": ["check", str(p)] for n, p in files.items()}
    argvs["train-empty"] = ["train", str(files["empty"]), "--out", str(tmp_path / "run-empty")]
    argvs["train-cut_at_line"] = ["train", str(files["cut_at_line"]), "--out", str(tmp_path / "run-cut")]
    procs = {k: subprocess.Popen([sys.executable, "-m", "moesaic", *a], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
             for k, a in argvs.items()}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = err.splitlines()
        assert proc.returncode == 2, (key, proc.returncode, out, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (key, err)
        path = argvs[key][1]
        assert f"error: {path}: " in lines[0], (key, err)
        assert CASES[key.split("-", 1)[1]][1] in lines[0], (key, err)
        assert out == "", (key, out)
    assert not (tmp_path / "run-empty").exists() and not (tmp_path / "run-cut").exists()


def test_every_cut_before_the_last_section_is_refused(tmp_path: Path) -> None:
    """configs/demo.yaml cut at every byte before its ``train:`` line: never accepted (it used to be for 686
    of those 1119 cuts, the empty file among them)."""
    p = tmp_path / "c.yaml"
    for n in range(TEXT.index(b"\ntrain:") + 1):
        p.write_bytes(TEXT[:n])
        with pytest.raises(ConfigError) as e:
            load_run_config_file(str(p))
        assert str(e.value).startswith(f"{p}: "), (n, str(e.value))
    p.write_bytes(TEXT)
    assert load_run_config_file(str(p)).train.max_steps > 0


def test_a_field_error_in_a_short_file_is_named_before_the_missing_sections(tmp_path: Path) -> None:
    p = tmp_path / "typo.yaml"
    p.write_text("model:\n  kind: moe_regression\ntrian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_run_config_file(str(p))
