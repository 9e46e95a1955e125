"""A key/value cache for generation: one entry per attention layer, grown along the sequence axis.

Each attention kind decides what it stores (keys and values for multi-head attention, a compressed
latent for MLA): ``update(layer_idx, *tensors)`` appends each ``[..., S_new, d]`` tensor along dim -2 and
returns the full tensors. ``seq_len`` counts the positions seen so far (the offset of the next token).
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self) -> None:
        self.layers: dict[int, tuple[Tensor, ...]] = {}
        self._seq_len = 0
        #: ``[B, seq_len]`` bool mask of real (non-padding) cached positions, or None when all are real.
        self.mask: Tensor | None = None

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def get_seq_length(self, layer_idx: int = 0) -> int:  # the name transformers uses
        return self._seq_len

    def update(self, layer_idx: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        old = self.layers.get(layer_idx)
        new = tensors if old is None else tuple(torch.cat((o, t), dim=-2) for o, t in zip(old, tensors))
        self.layers[layer_idx] = new
        return new

    def advance(self, n: int, mask_BS: Tensor | None = None) -> None:
        """Called once per model forward after every layer updated: ``n`` new positions were added."""
        if mask_BS is not None or self.mask is not None:
            B = mask_BS.shape[0] if mask_BS is not None else self.mask.shape[0]  # type: ignore[union-attr]
            dev = mask_BS.device if mask_BS is not None else self.mask.device  # type: ignore[union-attr]
            old = self.mask if self.mask is not None else torch.ones(B, self._seq_len, dtype=torch.bool, device=dev)
            new = mask_BS[:, -n:].bool() if mask_BS is not None else torch.ones(B, n, dtype=torch.bool, device=dev)
            self.mask = torch.cat((old, new), dim=1)
        self._seq_len += n

    def reorder(self, index_B: Tensor) -> None:
        """Select batch rows (beam search, dropping finished rows)."""
        self.layers = {i: tuple(t.index_select(0, index_B) for t in ts) for i, ts in self.layers.items()}
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index_B)
