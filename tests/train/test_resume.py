"""Bit-exact resume (docs/training.md, "Checkpoints"): 40 straight steps vs 20 + kill -9 + --resume, kills
inside a save (fault points of moesaic.train.faults, installed by tests/fault_launch.py), SIGTERM preemption;
real subprocesses, fp32, CPU, one thread."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SRC = str(Path(__file__).resolve().parents[2] / "src")
LAUNCH = str(Path(__file__).resolve().parents[1] / "fault_launch.py")


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _cmd(cfg, out, *args):
    return [sys.executable, "-m", "moesaic", "train", str(cfg), "--out", str(out), *args]


def _train(cfg, out, *args, env=None, kill_at=None):
    """``moesaic train``; ``kill_at=(point, step)``: SIGKILL at that fault point (tests/fault_launch.py)."""
    cmd = _cmd(cfg, out, *args)
    if kill_at is not None:
        cmd = [sys.executable, LAUNCH, "kill", kill_at[0], str(kill_at[1]), "--", *cmd[3:]]
    return subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=300)


def _losses(out):
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), "duplicate or unordered steps in metrics.jsonl"
    return {r["step"]: r["loss"] for r in recs}


def _resumed_at(stderr):
    m = re.search(r"resumed from \S+ at step (\d+)", stderr)
    assert m, stderr
    return int(m.group(1))


def _wait_for_step(out, step, proc, timeout=240):
    path = Path(out) / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists():
            lines = path.read_text().splitlines()
            if lines and lines[-1].endswith("}") and json.loads(lines[-1])["step"] >= step:
                return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.02)
    raise AssertionError("timeout")


@pytest.fixture(scope="module")
def reference(tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    r = _train(tiny_config, out)
    assert r.returncode == 0, r.stderr
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 41))
    return losses


def test_kill9_then_resume_is_bitwise_identical(reference, tiny_config, tmp_path):
    proc = subprocess.Popen(_cmd(tiny_config, tmp_path), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(tmp_path, 21, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    r = _train(tiny_config, tmp_path, "--resume")
    assert r.returncode == 0, r.stderr
    assert _resumed_at(r.stderr) >= 20
    assert _losses(tmp_path) == reference  # bitwise: float equality at every step 1..40


@pytest.mark.parametrize("point,expect_step", [("checkpoint.before_publish", 15), ("checkpoint.after_publish", 20)])
def test_kill_during_save_resumes_from_latest_complete(reference, tiny_config, tmp_path, point, expect_step):
    r = _train(tiny_config, tmp_path, kill_at=(point, 20))
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = _train(tiny_config, tmp_path, "--resume")
    assert r.returncode == 0, r.stderr
    assert _resumed_at(r.stderr) == expect_step
    assert _losses(tmp_path) == reference
    assert not list(tmp_path.glob(".step-*.tmp"))  # the partial save was cleaned up


def test_sigterm_finishes_step_saves_and_exits(reference, tiny_config, tmp_path):
    proc = subprocess.Popen(_cmd(tiny_config, tmp_path), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(tmp_path, 8, proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait() == 143, err
    m = re.search(r"SIGTERM: saved at step (\d+)", err)
    assert m, err
    stopped = int(m.group(1))
    assert (tmp_path / "LATEST").read_text().strip() == f"step-{stopped:08d}"  # 0 steps lost
    r = _train(tiny_config, tmp_path, "--resume")
    assert r.returncode == 0, r.stderr
    assert _resumed_at(r.stderr) == stopped
    assert _losses(tmp_path) == reference
