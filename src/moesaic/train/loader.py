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

from moesaic.errors import CheckpointMismatchError, ConfigError


class PackedLoader:
    def __init__(self, tokens: Tensor, seq_len: int, seed: int = 0, shuffle: bool = True):
        self.tokens, self.seq_len, self.seed, self.shuffle = tokens, seq_len, seed, shuffle
        self.num_windows = (tokens.numel() - 1) // seq_len
        if self.num_windows < 1:
            raise ConfigError("data.seq_len", seq_len, f"longer than the token stream ({tokens.numel()} tokens)")
        self.epoch, self.index = 0, 0
        self._order: Tensor | None = None

    def _perm(self) -> Tensor:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._order = torch.randperm(self.num_windows, generator=g)
            else:
                self._order = torch.arange(self.num_windows)
        return self._order

    def next_batch(self, batch_size: int) -> dict[str, Tensor]:
        """``input_ids`` and ``labels`` ``[batch_size, seq_len]`` (labels = inputs shifted by one)."""
        rows = []
        for _ in range(batch_size):
            w = int(self._perm()[self.index])
            rows.append(self.tokens[w * self.seq_len: w * self.seq_len + self.seq_len + 1])
            self.index += 1
            if self.index == self.num_windows:
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
        x = torch.stack(rows).long()
        return {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "seq_len", "num_windows"):
            if state.get(k) != getattr(self, k):
                raise CheckpointMismatchError(f"data position: {k} is {state.get(k)} in the checkpoint but "
                                              f"{getattr(self, k)} for this data")
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


def eval_windows(tokens: Tensor, seq_len: int, max_windows: int | None) -> list[Tensor]:
    """Consecutive non-overlapping windows ``[seq_len + 1]`` of a held-out stream (the first ``max_windows``)."""
    n = (tokens.numel() - 1) // seq_len
    n = min(n, max_windows) if max_windows else n
    return [tokens[i * seq_len: i * seq_len + seq_len + 1].long() for i in range(n)]
