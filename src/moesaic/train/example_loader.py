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

from moesaic.errors import CheckpointMismatchError, ConfigError

Balance = Literal["oversample", "none"]


def balanced_pool(y_N: Tensor, balance: Balance) -> Tensor:
    """Example indices of one epoch before shuffling (see the module docstring)."""
    if balance == "none":
        return torch.arange(y_N.numel())
    groups = [torch.nonzero(y_N == c).flatten() for c in torch.unique(y_N).tolist()]
    m = max(g.numel() for g in groups)
    return torch.cat([g[torch.arange(m) % g.numel()] for g in groups])


class ExampleLoader:
    def __init__(self, x_NS: Tensor, y_N: Tensor, seed: int = 0, balance: Balance = "oversample",
                 shuffle: bool = True):
        if x_NS.shape[0] == 0 or x_NS.shape[0] != y_N.shape[0]:
            raise ConfigError("data", x_NS.shape[0], "needs at least one training example with one label each")
        self.x_NS, self.y_N, self.seed, self.balance, self.shuffle = x_NS, y_N, seed, balance, shuffle
        self.pool = balanced_pool(y_N, balance)
        self.num_examples = int(self.pool.numel())
        self.epoch, self.index = 0, 0
        self._order: Tensor | None = None

    def _perm(self) -> Tensor:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._order = self.pool[torch.randperm(self.num_examples, generator=g)]
            else:
                self._order = self.pool
        return self._order

    def next_batch(self, batch_size: int) -> dict[str, Tensor]:
        """``input_ids`` ``[batch_size, S]`` and ``labels`` ``[batch_size]``."""
        idx = []
        for _ in range(batch_size):
            idx.append(int(self._perm()[self.index]))
            self.index += 1
            if self.index == self.num_examples:
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
        rows = torch.tensor(idx, dtype=torch.long)
        return {"input_ids": self.x_NS[rows].long().contiguous(), "labels": self.y_N[rows].long().contiguous()}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "balance": self.balance,
                "num_examples": self.num_examples, "seq_len": int(self.x_NS.shape[1])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in (("seed", self.seed), ("balance", self.balance), ("num_examples", self.num_examples),
                     ("seq_len", int(self.x_NS.shape[1]))):
            if state.get(k) != v:
                raise CheckpointMismatchError(f"data position: {k} is {state.get(k)} in the checkpoint but "
                                              f"{v} for this data")
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None
