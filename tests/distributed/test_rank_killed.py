"""`moesaic train --nproc 2` with one rank SIGKILLed: one `error:` line naming the rank and the signal (not
torchrun's ChildFailedError traceback), the surviving rank ends with one line too, nothing is published
after the last good checkpoint, and --resume finishes."""

import copy
import json
import sys
from pathlib import Path

import pytest
import yaml

import moesaic.distributed.launch as dl
from lm_fixtures import TINY
from moesaic.cli import main

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_killed_rank_is_one_line_and_nothing_is_published(tmp_path, monkeypatch, capfd, data_cache):
    cfg = tmp_path / "ep.yaml"
    data = copy.deepcopy(TINY)
    data["train"].update(max_steps=4, save_every=2, eval_every=100, dtype="float32")
    data["parallel"] = {"ep_size": 2}
    cfg.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("MOESAIC_PG_TIMEOUT", "30")
    launch = str(Path(__file__).resolve().parents[1] / "fault_launch.py")  # rank 1 killed at the start of step 3
    monkeypatch.setattr(dl, "WORKER", [launch, "kill", "step.begin", "2", "--rank", "1", "--"])
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    monkeypatch.setenv("PYTHONPATH", ":".join(sys.path))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--nproc", "2", "--out", str(out)]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert lines[-1].startswith("error: rank 1 of 2 was killed by SIGKILL"), lines
    # the survivor ends with one line: its collective fails first, or (a race: a loaded machine) torchrun's
    # SIGTERM reaches it first and it leaves through the graceful SIGTERM path
    assert (any(ln.startswith("error: rank 0 of 2: a collective failed at step 3") for ln in lines)
            or "SIGTERM: saved at step 2, exiting with 143" in err), err
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000002"]
    monkeypatch.setattr(dl, "WORKER", ["-m", "moesaic"])
    assert main(["train", str(cfg), "--nproc", "2", "--out", str(out), "--resume"]) == 0
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def _failure(exitcode: int, timestamp: int):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    f = ProcessFailure(local_rank=0, pid=1, exitcode=exitcode, error_file="<N/A>")  # a signal death: no error file
    f.timestamp = timestamp
    return f


def test_the_root_failure_is_the_killed_rank_not_the_peer_that_aborted():
    """torchrun stamps a signal death with the second it noticed it, so a rank killed from outside and a peer
    that aborted because its collective lost that rank often tie; the killed rank is the cause (the chaos run's
    'rank 1 killed mid-save' once reported rank 0's SIGABRT). An earlier failure still comes first."""
    import signal

    kill, abort, term = -signal.SIGKILL, -signal.SIGABRT, -signal.SIGTERM
    assert dl.first_failure({0: _failure(abort, 100), 1: _failure(kill, 100)}) == 1
    assert dl.first_failure({0: _failure(kill, 100), 1: _failure(abort, 100), 2: _failure(term, 100)}) == 0
    assert dl.first_failure({0: _failure(abort, 99), 1: _failure(kill, 100)}) == 0  # the abort was first
    assert dl.first_failure({2: _failure(abort, 100), 1: _failure(term, 100)}) == 1  # only consequences: lowest
    assert dl.first_failure({0: _failure(abort, 100), 3: _failure(1, 100)}) == 3  # an exit code is a cause
