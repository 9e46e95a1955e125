"""The in-process fault seam (moesaic.train.faults): named points production code passes, callbacks only tests
install; no fault is read from the environment by the package. The kill -9 tests (test_resume.py,
test_classification_trainer.py, distributed/test_reshard.py) use the same points through tests/fault_launch.py."""

import copy
import pathlib

import pytest

import moesaic
from moesaic.train import checkpoint as ckpt
from moesaic.train import faults
from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer


class Boom(Exception):
    pass


def _trainer(tiny_data, path):
    d = copy.deepcopy(tiny_data)
    d["train"].update(max_steps=4, save_every=2, batch_size=4)
    return Trainer(load_run_config(data=d), path)


def test_points_fire_in_order_with_the_step(tiny_data, data_cache, tmp_path):
    seen = []
    t = _trainer(tiny_data, tmp_path / "run")
    removers = [faults.install(p, lambda p=p, **info: seen.append((p, info["step"]))) for p in faults.POINTS]
    try:
        assert t.run() == 0
    finally:
        for r in removers:
            r()
    assert seen[:2] == [("step.begin", 0), ("step.after_backward", 0)]
    assert [s for s in seen if s[0].startswith("checkpoint.")][:3] == [
        ("checkpoint.after_files", 2), ("checkpoint.before_publish", 2), ("checkpoint.after_publish", 2)]
    faults.fault_point("checkpoint.after_files", step=2)  # removed: nothing happens


@pytest.mark.parametrize("point", ["checkpoint.after_files", "checkpoint.before_publish"])
def test_failure_inside_a_save_publishes_nothing(tiny_data, data_cache, tmp_path, point):
    t = _trainer(tiny_data, tmp_path / "run")
    t.train_step(t.loader.next_batch(4))
    first = t.save()

    def fail(step: int) -> None:
        raise Boom(step)

    t.train_step(t.loader.next_batch(4))
    with faults.installed(point, fail), pytest.raises(Boom):
        t.save()
    assert [s for s, _ in ckpt.list_steps(tmp_path / "run")] == [1]
    assert ckpt.latest_valid(tmp_path / "run") == first
    t.save()  # the next save cleans the partial directory up
    assert sorted(s for s, _ in ckpt.list_steps(tmp_path / "run")) == [1, 2]
    assert not list((tmp_path / "run").glob(".step-*.tmp"))


def test_unknown_point_is_rejected():
    with pytest.raises(KeyError, match="known: checkpoint.after_files"):
        faults.install("checkpoint.after_everything", lambda **info: None)


def test_the_package_reads_no_fault_environment_variables():
    src = pathlib.Path(moesaic.__file__).parent
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert "MOESAIC_FAULT" not in text and "MOESAIC_FAIL" not in text, path
