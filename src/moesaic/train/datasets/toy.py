"""A synthetic regression task with cluster structure, so that experts can specialise."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from moesaic.core.config import rule
from moesaic.train.datasets.base import DATASETS, DataConfig, Dataset


@dataclasses.dataclass
class ToyRegressionConfig(DataConfig):
    d_in: int = rule(8, ge=1)
    clusters: int = rule(4, ge=1)
    seed: int = 0


@DATASETS.register("toy_regression")
class ToyRegression(Dataset):
    """y = w_c . x + sin(x_0) for x drawn around one of ``clusters`` centres, w_c per cluster."""

    Config = ToyRegressionConfig
    cfg: ToyRegressionConfig

    def __init__(self, cfg: ToyRegressionConfig, **kw: Any):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        self.centres = 3.0 * torch.randn(cfg.clusters, cfg.d_in, generator=g)
        self.weights = torch.randn(cfg.clusters, cfg.d_in, generator=g)

    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        c = torch.randint(self.cfg.clusters, (n,), generator=generator)
        x = self.centres[c] + torch.randn(n, self.cfg.d_in, generator=generator)
        y = (self.weights[c] * x).sum(-1, keepdim=True) + torch.sin(x[:, :1])
        return x, y
