"""Multi-process training with global expert checkpoints (docs/parallel.md):
train at EP=2, resume at EP=4, EP=1 and back at EP=2; every expert tensor bitwise equal after the
round trips; the next step's loss equals the one-process reference; `moesaic train --nproc 2` and a
failing rank."""

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moesaic.distributed.launch import spawn
from moesaic.train.reshard_workers import reshard_worker
from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer

TINY = {
    "model": {"kind": "decoder_lm", "d_model": 16, "num_layers": 2, "d_ff": 32, "max_seq_len": 32,
              "attention": {"num_heads": 2},
              "moe": {"d_ff": 32, "num_experts": 4, "top_k": 2,
                      "router": {"kind": "topk", "aux_loss_coef": 0.01, "z_loss_coef": 0.001}}},
    "data": {"kind": "shakespeare", "tokenizer": "char", "seq_len": 16, "train_plays": ["macbeth"],
             "val_plays": ["tempest"], "eval_windows": 2},
    "train": {"max_steps": 3, "batch_size": 8, "grad_accum": 2, "lr": 0.003, "warmup_steps": 2, "log_every": 1,
              "eval_every": 1000, "save_every": 3, "keep_last": 5, "tensorboard": False, "progress": False,
              "threads": 1, "dtype": "float64", "eval_at_end": False},
}
STEP3 = "step-00000003"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def losses(run_dir):
    return {r["step"]: r["loss"] + r["aux_loss"] for r in map(json.loads, open(Path(run_dir) / "metrics.jsonl"))}


def tensors(run_dir, step_dir=STEP3):
    return load_file(str(Path(run_dir) / step_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    os.environ.setdefault("MOESAIC_CACHE", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("reshard")
    cfg = load_run_config(data={**TINY, "train": {**TINY["train"], "max_steps": 4}})
    Trainer(cfg, root / "ref").run()  # one process, 4 steps
    spawn(reshard_worker, 4, TINY, str(root), STEP3)  # EP 2 -> 1 -> 4 -> 2 (see reshard_worker)
    return {n: root / n for n in ("ref", "ep2", "ep1", "ep4", "back")}


@pytest.mark.timeout(400)
def test_ep2_training_matches_one_process(runs):
    ref, got = losses(runs["ref"]), losses(runs["ep2"])
    for s in (1, 2, 3):
        assert abs(got[s] - ref[s]) <= 1e-10 * abs(ref[s])
    a, b = tensors(runs["ref"]), tensors(runs["ep2"])
    assert a.keys() == b.keys()
    for n in a:
        assert (a[n] - b[n]).abs().max() <= 1e-9, n


def test_reshard_round_trip_bitwise(runs):
    src = tensors(runs["ep2"])
    experts = [n for n in src if n.endswith(("w_up_EHD", "w_down_EDF"))]
    assert len(experts) == 4 and all(src[n].shape[0] == 4 for n in experts)
    for name in ("ep1", "ep4", "back"):  # EP 2 -> 1 -> 4 -> 2, each re-saved from what it loaded
        got = tensors(runs[name])
        assert got.keys() == src.keys()
        for n in src:
            assert torch.equal(got[n], src[n]), (name, n)
        opt_a = torch.load(runs["ep2"] / STEP3 / "optimizer.pt", weights_only=True)["state"]
        opt_b = torch.load(runs[name] / STEP3 / "optimizer.pt", weights_only=True)["state"]
        for i in opt_a:
            for k, v in opt_a[i].items():
                assert torch.equal(v, opt_b[i][k]), (name, i, k)


def test_next_step_loss_after_resharding(runs):
    ref = losses(runs["ref"])[4]
    for name in ("ep4", "ep1", "back"):
        got = losses(runs[name])
        assert list(got) == [4]
        assert abs(got[4] - ref) <= 1e-12 * abs(ref), name


def test_manifest_lists_each_expert_once(runs):
    d = runs["ep2"] / STEP3
    manifest = json.loads((d / "manifest.json").read_text())
    assert "experts.json" in manifest["files"]
    experts = json.loads((d / "experts.json").read_text())
    assert len(experts) == 4  # 2 layers x (w_up, w_down)
    for name, e in experts.items():
        assert e["experts"] == [0, 1, 2, 3] and e["num_experts"] == 4
        assert len(set(e["sha256"])) == 4, name  # distinct contents: no rank saved its slice twice


@pytest.mark.timeout(300)
def test_cli_nproc_and_failing_rank(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    data = copy.deepcopy(TINY)
    data["train"].update(max_steps=2, save_every=1, dtype="float32")
    data["parallel"] = {"ep_size": 2}
    cfg.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MOESAIC_PG_TIMEOUT": "30"}
    cmd = [sys.executable, "-m", "moesaic", "train", str(cfg), "--nproc", "2"]
    ok = subprocess.run([*cmd, "--out", str(tmp_path / "ok")], env=env, capture_output=True, text=True, timeout=240)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "ok" / "step-00000002" / "experts.json").is_file()
    assert [r["step"] for r in map(json.loads, open(tmp_path / "ok" / "metrics.jsonl"))] == [1, 2]
    t0 = time.time()
    launch = str(Path(__file__).resolve().parents[1] / "fault_launch.py")  # rank 1 raises at step 0
    failing = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
               launch, "fail", "step.begin", "0", "--rank", "1", "--", "train", str(cfg)]
    bad = subprocess.run([*failing, "--out", str(tmp_path / "bad")], env={**env, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=240)
    assert bad.returncode != 0 and "rank 1 fails" in bad.stderr
    assert time.time() - t0 < 30 + 60
    assert not list((tmp_path / "bad").glob("step-*")) and not (tmp_path / "bad" / "LATEST").exists()
