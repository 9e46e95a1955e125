"""Deterministic loader over a fixed set of labelled examples (sequence classification); its position is
part of every checkpoint, like :class:`~moesaic.train.loader.PackedLoader`'s.

Examples are rows of ``x_NS`` with labels ``y_N``. With ``balance="oversample"`` the epoch pool holds every
class equally often: each class's examples (in index order) are repeated cyclically up to the size of the
largest class, so a minority-class example appears at most once more than any other of its class; with
``"none"`` the pool is every example once. Epoch ``e`` visits the pool in the permutation drawn from
``torch.Generator().manual_seed(seed * 1_000_003 + e)``, so the position ``(epoch, index)`` alone determines
every future batch: resuming restores it and nothing else is needed.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from moesaic.core.errors import ConfigError
from moesaic.train.loader import EpochPosition

Balance = Literal["oversample", "none"]


def balanced_pool(y_N: Tensor, balance: Balance) -> Tensor:
    """Example indices of one epoch before shuffling (see the module docstring)."""
    if balance == "none":
        return torch.arange(y_N.shape[0])
    groups = [torch.nonzero(y_N == c).flatten() for c in torch.unique(y_N).tolist()]
    m = max(g.numel() for g in groups)
    return torch.cat([g[torch.arange(m) % g.numel()] for g in groups])


class ExampleLoader(EpochPosition):
    def __init__(self, x_NS: Tensor, y_N: Tensor, seed: int = 0, balance: Balance = "oversample",
                 shuffle: bool = True, input_key: str = "input_ids"):
        if x_NS.shape[0] == 0 or x_NS.shape[0] != y_N.shape[0]:
            raise ConfigError("data", x_NS.shape[0], "needs at least one training example with one label each")
        self.x_NS, self.y_N, self.balance, self.input_key = x_NS, y_N, balance, input_key
        pool = balanced_pool(y_N, balance)
        self.num_examples = int(pool.numel())
        super().__init__(self.num_examples, seed, shuffle, pool)

    def next_batch(self, batch_size: int) -> dict[str, Tensor]:
        """``input_ids`` ``[batch_size, S]`` and ``labels`` ``[batch_size]`` (float inputs and targets, such as
        forecasting windows, keep their dtype under their ``input_key``)."""
        rows = torch.tensor(self.take(batch_size), dtype=torch.long)
        x, y = self.x_NS[rows].contiguous(), self.y_N[rows].contiguous()
        if not x.is_floating_point():
            x, y = x.long(), y.long()
        return {self.input_key: x, "labels": y}

    def identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "balance": self.balance, "num_examples": self.num_examples,
                "seq_len": int(self.x_NS.shape[1])}
