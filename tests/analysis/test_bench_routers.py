"""`moesaic bench routers`: who enters the leaderboard, matched active parameters, runs read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moesaic.bench.routers import eligibility, overrides
from moesaic.cli import main
from moesaic.train.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[2]


def test_eligibility_and_matched_active_width() -> None:
    e = eligibility()
    assert e["expert_choice"] == "not causal" and e["soft_moe"] == "not causal"
    assert e["task_gates"].startswith("needs labels") and e["domain"].startswith("needs labels")
    assert e["hash"] == e["topk"] == e["switch"] == e["gshard"] == ""
    demo = load_run_config(ROOT / "configs" / "demo.yaml").model.moe
    for name in (n for n, why in e.items() if not why):
        moe = load_run_config(ROOT / "configs" / "demo.yaml", overrides(name)).model.moe
        assert moe.router.kind == name
        assert moe.routed_top_k * moe.expert_d_ff == demo.routed_top_k * demo.expert_d_ff == 384, name
        assert moe.routed_experts * moe.expert_d_ff == demo.routed_experts * demo.expert_d_ff, name


def test_leaderboard_runs_and_reads_back(tiny_config: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "routers", "--config", str(tiny_config), "--steps", "3", "--seeds", "0",
            "--routers", "topk,switch", "--out", str(tmp_path / "lb"), "--timing-steps", "2", "--threads", "1",
            "--markdown", str(tmp_path / "lb.md")]
    assert main(args) == 0
    table = (tmp_path / "lb.md").read_text()
    assert "| topk |" in table and "| switch |" in table and "Not eligible: domain" in table
    rows = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())["rows"]
    assert {r["router"] for r in rows} == {"topk", "switch"} and all(r["val_loss"] > 0 for r in rows)
    metrics = tmp_path / "lb" / "topk-seed0" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    assert main(args) == 0  # finished runs are read back, not trained again
    assert metrics.stat().st_mtime_ns == before
    capsys.readouterr()
    assert main([*args[:9], "expert_choice", *args[10:]]) == 2
    assert "cannot enter the leaderboard: not causal" in capsys.readouterr().err
