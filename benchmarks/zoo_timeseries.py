"""Time-series MoE forecaster (configs/zoo/timeseries_moe.yaml) against its dense twin (equal active
parameters, 3 seeds), seasonal naive and statsmodels' ETS (damped additive trend, additive season where the
series has one), by MASE on the held-out end of each series (forecast origins every ``horizon`` points).

MASE = mean absolute error of the forecast / in-sample mean absolute error of the seasonal naive forecast on
the training part of the series (Hyndman & Koehler 2006); below 1 beats seasonal naive.

Usage: ``python benchmarks/zoo_timeseries.py [--steps 800] [--seeds 0,1,2] [--markdown OUT.md]``.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from pathlib import Path

import numpy as np
import torch
from zoo_common import train

from moesaic.train.datasets.series import PERIOD, TimeSeries, normalise

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "zoo" / "timeseries_moe.yaml"


def seasonal_naive(history: np.ndarray, m: int, H: int) -> np.ndarray:
    return np.array([history[len(history) - m + (h % m)] for h in range(H)])


def ets(history: np.ndarray, m: int, H: int) -> np.ndarray:
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    seasonal = "add" if m > 1 and len(history) >= 2 * m else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = ExponentialSmoothing(history, trend="add", damped_trend=True, seasonal=seasonal,
                                   seasonal_periods=m if seasonal else None).fit()
    return np.asarray(fit.forecast(H))


def scale(data: TimeSeries, name: str) -> float:
    v = data.raw[name]
    train = v[: int(len(v) * (1 - data.cfg.val_fraction))]
    m = PERIOD[name]
    return float(np.abs(train[m:] - train[:-m]).mean())


@torch.no_grad()
def model_forecast(model: torch.nn.Module, history: np.ndarray, L: int) -> np.ndarray:
    ctx = history[-L:]
    loc, sc = normalise(ctx)
    x = torch.tensor((ctx - loc) / sc, dtype=torch.float32)[None]
    return model(x).logits[0, -1].double().numpy() * sc + loc


def mase_table(data: TimeSeries, forecasts: dict[str, list[np.ndarray]]) -> dict[str, dict[str, float]]:
    """Method -> series -> MASE (mean over that series' origins)."""
    out: dict[str, dict[str, float]] = {}
    for method, fc in forecasts.items():
        per: dict[str, list[float]] = {}
        for o, f in zip(data.origins, fc):
            per.setdefault(o.series, []).append(float(np.abs(f - o.future).mean()) / scale(data, o.series))
        out[method] = {s: float(np.mean(v)) for s, v in per.items()}
    return out



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--markdown", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[str, list[dict[str, float]]] = {"MoE (8 experts, top-2)": [], "dense twin": []}
    data: TimeSeries | None = None
    for seed in seeds:
        for name, sets in (("MoE (8 experts, top-2)", []), ("dense twin", ["model.moe=null"])):
            t = train(RECIPE, sets, seed, args.steps)
            data = t.data
            model = t.model.eval()
            L, H = data.cfg.context, data.cfg.horizon
            fc = [model_forecast(model, o.history, L) for o in data.origins]
            runs[name].append(mase_table(data, {name: fc})[name])
            print(name, seed, runs[name][-1], flush=True)
    assert data is not None
    H = data.cfg.horizon
    base = mase_table(data, {"seasonal naive": [seasonal_naive(o.history, PERIOD[o.series], H) for o in data.origins],
                             "ETS (statsmodels)": [ets(o.history, PERIOD[o.series], H) for o in data.origins]})
    series = list(dict.fromkeys(o.series for o in data.origins))
    n_orig = {s: sum(o.series == s for o in data.origins) for s in series}
    lines = ["| method | " + " | ".join(f"{s} ({n_orig[s]})" for s in series) + " | mean |",
             "|---|" + "---|" * (len(series) + 1)]
    for name, rs in runs.items():
        def cell(xs: list[float]) -> str:
            return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.3f}"

        cells = [cell([r[s] for r in rs]) for s in series]
        cells.append(cell([statistics.mean(r[s] for s in series) for r in rs]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, r in base.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[s]:.3f}" for s in series)
                     + f" | {statistics.mean(r[s] for s in series):.3f} |")
    md = "\n".join(lines) + (f"\n\nMASE on held-out origins (count in brackets), horizon {H}, context "
                             f"{data.cfg.context}; {args.steps} steps, seeds {seeds}.\n")
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md)


if __name__ == "__main__":
    main()
