"""Deterministic packed-sequence loader over a token stream; its position is part of every checkpoint.

The stream (documents joined by end-of-text ids) is cut into non-overlapping windows of ``seq_len + 1``
tokens (packing: no padding, every position is a training target; attention may cross a document border,
as in GPT-2/3 training). Epoch ``e`` visits the windows in a permutation drawn from
``torch.Generator().manual_seed(seed * 1_000_003 + e)``, so the position ``(epoch, index)`` alone
determines every future batch: resuming restores it and nothing else is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moesaic.core.errors import CheckpointMismatchError, ConfigError


class EpochPosition:
    """Shuffled epochs over ``num_items`` items and the position ``(epoch, index)`` in them.

    Epoch ``e`` visits ``pool[randperm(num_items)]`` (or ``pool`` in order without shuffling; ``pool`` defaults to
    ``arange(num_items)``) with the generator seeded ``seed * 1_000_003 + e``. Subclasses name the fields that
    must match on resume (:meth:`identity`)."""

    def __init__(self, num_items: int, seed: int, shuffle: bool, pool: Tensor | None = None):
        self.num_items, self.seed, self.shuffle, self.pool = num_items, seed, shuffle, pool
        self.epoch, self.index = 0, 0
        self._order: Tensor | None = None

    def _perm(self) -> Tensor:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                order = torch.randperm(self.num_items, generator=g)
                self._order = self.pool[order] if self.pool is not None else order
            else:
                self._order = self.pool if self.pool is not None else torch.arange(self.num_items)
        return self._order

    def take(self, n: int) -> list[int]:
        """The next ``n`` item indices, advancing the position (and the epoch at its end)."""
        out = []
        for _ in range(n):
            out.append(int(self._perm()[self.index]))
            self.index += 1
            if self.index == self.num_items:
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return out

    def identity(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, **self.identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in self.identity().items():
            if state.get(k) != v:
                raise CheckpointMismatchError(f"data position: {k} is {state.get(k)} in the checkpoint but "
                                              f"{v} for this data")
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


class PackedLoader(EpochPosition):
    def __init__(self, tokens: Tensor, seq_len: int, seed: int = 0, shuffle: bool = True):
        self.tokens, self.seq_len = tokens, seq_len
        self.num_windows = (tokens.numel() - 1) // seq_len
        if self.num_windows < 1:
            raise ConfigError("data.seq_len", seq_len, f"longer than the token stream ({tokens.numel()} tokens)")
        super().__init__(self.num_windows, seed, shuffle)

    def next_batch(self, batch_size: int) -> dict[str, Tensor]:
        """``input_ids`` and ``labels`` ``[batch_size, seq_len]`` (labels = inputs shifted by one)."""
        x = torch.stack([self.tokens[w * self.seq_len: w * self.seq_len + self.seq_len + 1]
                         for w in self.take(batch_size)]).long()
        return {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}

    def identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "seq_len": self.seq_len, "num_windows": self.num_windows}


def eval_windows(tokens: Tensor, seq_len: int, max_windows: int | None) -> list[Tensor]:
    """Consecutive non-overlapping windows ``[seq_len + 1]`` of a held-out stream (the first ``max_windows``)."""
    n = (tokens.numel() - 1) // seq_len
    n = min(n, max_windows) if max_windows else n
    return [tokens[i * seq_len: i * seq_len + seq_len + 1].long() for i in range(n)]
