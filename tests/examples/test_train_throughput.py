"""Smoke tests of benchmarks/train_throughput.py at tiny sizes: both modes produce the fields the docs quote."""

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"
TINY = ["--set", "model.d_model=32", "--set", "model.num_layers=2", "--set", "model.d_ff=40",
        "--set", "model.moe.d_ff=24", "--set", "model.attention.num_heads=2", "--set", "data.seq_len=16",
        "--set", "train.batch_size=2", "--set", "model.vocab_size=64"]


def test_demo_mode_reports_both_ratios(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["x", "configs/demo.yaml", "--steps", "1", "--repeats", "3", "--json", str(out),
                                      *TINY])
    monkeypatch.chdir(SCRIPT.parents[1])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    r = json.loads(out.read_text())
    assert r["moe"]["active_params"] < r["moe"]["params"]
    assert r["dense"]["active_params"] == r["dense"]["params"]
    assert r["ratio_moe_over_dense"] > 0 and r["ratio_moe_over_dense_cpu_time"] > 0
    walls = sorted(x["wall"] for x in r["repeats"])
    assert len(walls) == 3 and r["ratio_moe_over_dense"] == walls[1]  # the median of the repeats


def test_reference_runs_build_and_train_transformers_peers(monkeypatch):
    pytest.importorskip("transformers")
    mod = runpy.run_path(str(SCRIPT))
    runs = {"mixtral": mod["hf_run"]("moe", 32, 1, 2, 64, 16, E=4, k=2, Fd=16),
            "llama": mod["hf_run"]("dense", 32, 1, 2, 64, 16, Fd=32)}
    res = mod["measure"](runs, (2, 16), 64, steps=1)
    assert set(res) == {"mixtral", "llama"} and all(v["tokens_per_s"] > 0 for v in res.values())
    assert res["mixtral"]["params"] > res["llama"]["params"]
