"""A preallocated (static-shape) key/value cache for decoding, with row and column views.

Storage: for every attention layer and every tensor it caches (keys and values for multi-head attention,
the latent for MLA), one buffer ``[R, ..., C, d]`` allocated once on first use (R rows = the batch
capacity, C columns = the sequence capacity). Nothing is concatenated per step: a step writes its
``[n, ..., S, d]`` tensors into columns ``[L, L + S)`` and attention reads the view ``[:n, ..., :L + S]``.

All live rows share one column cursor ``L`` (left padding: a row whose prompt is shorter starts at a later
column and its earlier columns are masked), so a decode step writes one column slice for the whole batch
(vLLM's paged cache solves the general case; a shared cursor keeps this a plain slice copy).

:class:`CacheView` is what the model sees: it has the interface of :class:`moesaic.models.cache.KVCache`
(``update``, ``seq_len``, ``mask``, ``advance``) over a row range and a starting column, so a prompt can
be prefilled alone into its own row (exactly as it would be decoded alone) or a left-padded batch into
many rows at once.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StaticKVCache:
    """Buffers ``[rows, ..., cols, d]`` per layer, allocated lazily from the first tensors written."""

    def __init__(self, rows: int, cols: int):
        self.rows, self.cols = rows, cols
        self.layers: dict[int, tuple[Tensor, ...]] = {}

    def buffers(self, layer_idx: int, like: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        bufs = self.layers.get(layer_idx)
        if bufs is None:
            bufs = tuple(torch.zeros((self.rows, *t.shape[1:-2], self.cols, t.shape[-1]), dtype=t.dtype,
                                     device=t.device) for t in like)
            self.layers[layer_idx] = bufs
        return bufs

    def view(self, rows: slice, col0: int, seq_len: int, layer_offset: int = 0) -> CacheView:
        """The cache seen by a forward over ``rows``, whose position 0 is column ``col0`` and which has
        ``seq_len`` columns filled already. ``layer_offset`` gives a second model pass its own layers
        (self-contrast decoding runs the model twice per step)."""
        return CacheView(self, rows, col0, seq_len, layer_offset)

    def shift(self, cols: slice, delta: int) -> None:
        """Move the columns ``cols`` by ``delta`` (positive: right) in every buffer (compaction)."""
        start, stop = cols.start or 0, cols.stop
        for bufs in self.layers.values():
            for b in bufs:
                b[..., start + delta:stop + delta, :] = b[..., start:stop, :].clone()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for bufs in self.layers.values() for b in bufs)


class CacheView:
    """``KVCache``'s interface over rows ``rows`` and columns ``[col0, col0 + seq_len)`` of a static cache.

    ``mask`` stays None: the decode session always passes the attention mask explicitly, so the model
    never concatenates a cached mask."""

    mask: Tensor | None = None

    def __init__(self, store: StaticKVCache, rows: slice, col0: int, seq_len: int, layer_offset: int = 0):
        self.store, self.rows, self.col0, self._seq_len = store, rows, col0, seq_len
        self.layer_offset = layer_offset
        #: Rows ``[0, store.rows)``: the buffers are used as they are (no row slice per layer and step).
        self._all_rows = ((rows.start or 0) == 0 and rows.step in (None, 1)
                          and (rows.stop is None or rows.stop >= store.rows))

    def sibling(self, layer_offset: int) -> CacheView:
        """The same rows and columns, layers numbered from ``layer_offset`` (a second pass's own cache)."""
        return CacheView(self.store, self.rows, self.col0, self._seq_len, layer_offset)

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def get_seq_length(self, layer_idx: int = 0) -> int:  # the name transformers uses
        return self._seq_len

    def update(self, layer_idx: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        c0, L, S = self.col0, self._seq_len, tensors[0].shape[-2]
        if c0 + L + S > self.store.cols:
            raise IndexError(f"static KV cache full: {c0 + L + S} columns needed, {self.store.cols} allocated")
        out = []
        for buf, t in zip(self.store.buffers(layer_idx + self.layer_offset, tensors), tensors, strict=True):
            rows = buf if self._all_rows else buf[self.rows]
            rows.narrow(-2, c0 + L, S).copy_(t)  # = rows[..., c0 + L:c0 + L + S, :] = t
            out.append(rows.narrow(-2, c0, L + S))
        return tuple(out)

    def advance(self, n: int, mask_BS: Tensor | None = None) -> None:
        self._seq_len += n

    def reorder(self, index_B: Tensor) -> None:
        raise TypeError("a static cache view cannot reorder rows; cancel rows in the DecodeSession instead")
