"""What `moesaic train` may write into, and what a failed write leaves behind (issue 20's defects):

* ``--out`` naming a non-empty folder that no run wrote is refused (config.yaml and metrics.jsonl there were
  overwritten / truncated before); a run folder of ours (marker, or a pre-marker run's checkpoints) is fine;
* a checkpoint write that fails (file size limit here: RLIMIT_FSIZE, the mechanism an unprivileged test can use;
  `make chaos` also fills a real tmpfs and remounts the folder read-only) ends the run with one line naming the
  folder, exit 2, no traceback, and the previous checkpoint intact and loadable."""

import copy
import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import yaml

import moesaic
from moesaic.cli import main as cli_main
from moesaic.core.errors import ConfigError
from moesaic.train import checkpoint as ckpt
from moesaic.train.run_config import load_run_config
from moesaic.train.run_folder import MARKER
from moesaic.train.trainer import Trainer


def _cfg(tiny_data, **train):
    d = copy.deepcopy(tiny_data)
    d["train"].update({"max_steps": 2, "save_every": 2, "eval_every": 100, **train})
    return d


def test_a_users_folder_is_refused_untouched(tiny_data, data_cache, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my notes\n")
    (out / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    with pytest.raises(ConfigError, match=r"--out = .*non-empty folder that no training run wrote"):
        Trainer(load_run_config(data=_cfg(tiny_data)), out, log=lambda _m: None)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert (out / "config.yaml").read_text() == "my notes\n"
    assert (out / "metrics.jsonl").read_text() == '{"step": 7, "loss": 1.0}\n'


def test_cli_refuses_with_one_line(tiny_data, data_cache, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tiny_data)))
    assert cli_main(["train", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out = ") and "Traceback" not in err[0]
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_run_folders_of_ours_are_accepted(tiny_data, data_cache, tmp_path):
    out = tmp_path / "run"
    Trainer(load_run_config(data=_cfg(tiny_data)), out, log=lambda _m: None)  # never saved
    assert (out / MARKER).is_file()
    Trainer(load_run_config(data=_cfg(tiny_data)), out, log=lambda _m: None)  # a rerun of our own folder
    t = Trainer(load_run_config(data=_cfg(tiny_data)), out, log=lambda _m: None)
    assert t.run() == 0
    (out / MARKER).unlink()  # a run from before the marker: its checkpoints identify it
    t = Trainer(load_run_config(data=_cfg(tiny_data, max_steps=3)), out, resume=True, log=lambda _m: None)
    assert t.step == 2


_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from moesaic.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous(tiny_data, data_cache, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tiny_data, log_every=100)))
    out = tmp_path / "run"
    assert cli_main(["train", str(cfg), "--out", str(out)]) == 0
    first = out / "step-00000002"
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    limit = 4096
    assert (first / "model.safetensors").stat().st_size > limit > max(
        (out / n).stat().st_size for n in ("metrics.jsonl", "config.yaml"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", _LIMITED, str(limit), "train", str(cfg), "--out", str(out), "--resume",
                        "--set", "train.max_steps=4"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write checkpoint step-00000004 to {out}: "), last
    assert [s for s, _ in ckpt.list_steps(out)] == [2] and not list(out.glob(".step-*.tmp"))
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert ckpt.latest_valid(out) == first and moesaic.load(out) is not None
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] <= 4
    assert resource.RLIMIT_FSIZE and signal.SIGXFSZ  # the mechanism exists on this platform
