"""Real time series from statsmodels (``data: {kind: ts_series}``) for forecasting, Time-MoE style: one
model is trained on windows of every series at once, each window scaled by its own context (instance
normalisation), and evaluated on the held-out end of each series.

Series (frequency -> seasonal period ``m`` of the seasonal-naive baseline): ``sunspots`` (yearly sunspot
activity 1700-2008, m=1), ``nile`` (yearly Nile flow 1871-1970, m=1), ``co2`` (weekly Mauna Loa CO2 1958-2001,
gaps linearly interpolated, m=52), ``elnino`` (monthly sea surface temperature 1950-2010, m=12) and six
quarterly ``macrodata`` series 1959-2009 (real GDP, consumption, investment, CPI, unemployment, T-bill rate;
m=4). The last ``val_fraction`` of each series is held out: training windows lie wholly before it; forecast
origins step through it by ``horizon``, each with the ``context`` points before it.

A batch holds ``past_values`` ``[B, L]`` (normalised context) and ``labels`` ``[B, L, H]``: for position t,
the next H normalised values where they fall inside the window (NaN beyond; not counted).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moesaic.core.config import require, rule
from moesaic.core.errors import ConfigError
from moesaic.train.datasets.base import DATASETS, DataConfig, Dataset
from moesaic.train.example_loader import ExampleLoader

MACRO = ("realgdp", "realcons", "realinv", "cpi", "unemp", "tbilrate")
PERIOD = {"sunspots": 1, "nile": 1, "co2": 52, "elnino": 12, **{f"macrodata:{c}": 4 for c in MACRO}}


def load_series(name: str) -> np.ndarray:
    """One series as float64 values (see the module docstring)."""
    try:
        import statsmodels.api as sm
    except ImportError:
        raise ConfigError("data.kind", "ts_series", "needs statsmodels: pip install statsmodels",
                          show_value=False) from None
    if name == "sunspots":
        return sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(float)
    if name == "nile":
        return sm.datasets.nile.load_pandas().data["volume"].to_numpy(float)
    if name == "co2":
        return sm.datasets.co2.load_pandas().data["co2"].interpolate().bfill().to_numpy(float)
    if name == "elnino":
        return sm.datasets.elnino.load_pandas().data.iloc[:, 1:].to_numpy(float).reshape(-1)
    if name.startswith("macrodata:"):
        return sm.datasets.macrodata.load_pandas().data[name.split(":", 1)[1]].to_numpy(float)
    raise ConfigError("data.series", name, f"unknown series; known: {', '.join(PERIOD)}")


def normalise(context_L: np.ndarray) -> tuple[float, float]:
    """Location and scale of a context (its mean and standard deviation, scale at least 1e-6 of |mean|+1)."""
    loc = float(context_L.mean())
    return loc, max(float(context_L.std()), 1e-6 * (abs(loc) + 1.0))


def targets(window_W: np.ndarray, L: int, H: int) -> np.ndarray:
    """``[L, H]``: row t holds window[t+1 .. t+H], NaN past the window's end."""
    out = np.full((L, H), np.nan)
    for h in range(H):
        n = min(L, len(window_W) - 1 - h)
        out[:n, h] = window_W[1 + h:1 + h + n]
    return out


@dataclasses.dataclass
class SeriesConfig(DataConfig):
    series: list[str] = dataclasses.field(default_factory=lambda: list(PERIOD))
    context: int = rule(48, ge=2, doc="context length L (points)")
    horizon: int = rule(8, ge=1, doc="forecast horizon H (points)")
    val_fraction: float = rule(0.2, gt=0.0, lt=1.0)
    stride: int = rule(1, ge=1, doc="step between training windows")

    def validate(self, path: str) -> None:
        require(bool(self.series), f"{path}.series", self.series, "must name at least one series")
        for i, s in enumerate(self.series):
            require(s in PERIOD, f"{path}.series.{i}", s, f"unknown series; known: {', '.join(PERIOD)}")


@dataclasses.dataclass
class Origin:
    """One held-out forecast: series, the raw history before the origin, the raw next H values."""

    series: str
    history: np.ndarray
    future: np.ndarray


@DATASETS.register("ts_series")
class TimeSeries(Dataset):
    """statsmodels' real series as forecasting windows (Time-MoE-style, instance-normalised)."""

    Config = SeriesConfig
    cfg: SeriesConfig
    vocab_size = None

    def __init__(self, cfg: SeriesConfig, **kw: Any):
        self.cfg = cfg
        L, H = cfg.context, cfg.horizon
        self.horizon = H
        xs, ys = [], []
        self.origins: list[Origin] = []
        self.raw: dict[str, np.ndarray] = {}
        for name in cfg.series:
            v = load_series(name)
            self.raw[name] = v
            split = int(len(v) * (1 - cfg.val_fraction))
            if split < L + H:
                raise ConfigError("data.context", L, f"series {name} has {split} training points, fewer than "
                                                     f"context + horizon ({L + H})")
            for s in range(0, split - (L + H) + 1, cfg.stride):
                w = v[s:s + L + H]
                loc, scale = normalise(w[:L])
                xs.append((w[:L] - loc) / scale)
                ys.append(targets((w - loc) / scale, L, H))
            for t in range(split, len(v) - H + 1, H):
                self.origins.append(Origin(name, v[:t], v[t:t + H]))
        self.train_x = torch.tensor(np.stack(xs), dtype=torch.float32)
        self.train_y = torch.tensor(np.stack(ys), dtype=torch.float32)
        self.val_x, self.val_y = self._origin_tensors()

    def _origin_tensors(self) -> tuple[Tensor, Tensor]:
        L, H = self.cfg.context, self.cfg.horizon
        xs, ys = [], []
        for o in self.origins:
            ctx = o.history[-L:]
            loc, scale = normalise(ctx)
            xs.append((ctx - loc) / scale)
            y = np.full((L, H), np.nan)
            y[-1] = (o.future - loc) / scale  # only the last position's forecast is scored
            ys.append(y)
        return torch.tensor(np.stack(xs), dtype=torch.float32), torch.tensor(np.stack(ys), dtype=torch.float32)

    def loader(self, seed: int) -> ExampleLoader:
        return ExampleLoader(self.train_x, self.train_y, seed, balance="none", input_key="past_values")

    def eval_batches(self, batch_size: int) -> list[dict[str, Tensor]]:
        return [{"past_values": self.val_x[i:i + batch_size], "labels": self.val_y[i:i + batch_size]}
                for i in range(0, len(self.val_x), batch_size)]
