"""Time-MoE-style forecaster on statsmodels' series (configs/zoo/timeseries_moe.yaml): windows and targets
against brute force, the NaN-aware loss, the short recipe through the CLI, typed errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moesaic.cli import main
from moesaic.train.datasets.series import PERIOD, TimeSeries, load_series, normalise, targets
from moesaic.train.run_config import load_run_config
from moesaic.train.task import ForecastTask

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "zoo" / "timeseries_moe.yaml"


def test_targets_and_windows_brute_force() -> None:
    w = np.arange(10.0)
    t = targets(w, 6, 3)
    for i in range(6):
        for h in range(3):
            want = w[i + 1 + h] if i + 1 + h < 10 else math.nan
            assert (math.isnan(want) and math.isnan(t[i, h])) or t[i, h] == want
    data = TimeSeries(load_run_config(RECIPE, ["data.series=[nile, elnino]"]).data)  # type: ignore[arg-type]
    nile = load_series("nile")
    split = int(len(nile) * 0.8)
    first = nile[:56]
    loc, sc = normalise(first[:48])
    assert torch.allclose(data.train_x[0], torch.tensor((first[:48] - loc) / sc, dtype=torch.float32))
    assert len([o for o in data.origins if o.series == "nile"]) == len(range(split, len(nile) - 8 + 1, 8))
    o = data.origins[0]
    assert o.series == "nile" and len(o.history) == split and np.array_equal(o.future, nile[split:split + 8])
    assert set(PERIOD) >= {"sunspots", "co2", "nile", "elnino"}


def test_forecast_loss_ignores_missing_targets() -> None:
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    lab = torch.tensor([[[0.0, math.nan], [3.0, 2.0]]])
    s, n = ForecastTask().loss_sum(pred, lab)
    assert n == 3 and float(s) == pytest.approx(1.0 + 0.0 + 4.0)


def test_recipe_trains_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", str(RECIPE), "--out", str(out), "--set", "train.max_steps=40",
                 "--set", "train.warmup_steps=4",
                 "--set", "train.eval_every=40", "--set", "train.log_every=1", "--set", "train.threads=1",
                 "--set", "data.series=[sunspots, elnino]", "--set", "train.grad_accum=2"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert "val_mae" in capsys.readouterr().out
    bad = ["check", str(RECIPE), "--set", "model.horizon=4"]
    assert main(["train", *bad[1:], "--out", str(tmp_path / "bad")]) == 2
    assert "model.horizon" in capsys.readouterr().err
