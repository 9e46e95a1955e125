"""Collectives for expert parallelism, with gradients.

gloo supports ``all_to_all_single`` with uneven splits on CPU but not the list form ``all_to_all``
(PyTorch issue #88245). We therefore (a) use ``all_to_all_single`` with explicit split
sizes, (b) probe it once per group, and (c) fall back to an all-gather-then-slice emulation if the probe
fails. :class:`_AllToAll` makes the exchange differentiable: its backward is the same exchange with the
split sizes swapped (the mechanism of ``torch.distributed.nn.functional.all_to_all_single``, which is
deprecated in recent PyTorch and warns on every call, so we keep our own eight-line Function).

Every rank must call these functions in the same order, whatever its load: zero rows are fine.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

_PROBED: dict[int, bool] = {}
#: Use the all-gather emulation even where all_to_all_single works (tests of the fallback).
FORCE_EMULATION = False


def _probe(group: dist.ProcessGroup | None) -> bool:
    """Whether ``all_to_all_single`` works on this group (collective; cached)."""
    key = id(group)
    if key not in _PROBED:
        W = dist.get_world_size(group)
        try:
            out = torch.empty(W, dtype=torch.int64)
            dist.all_to_all_single(out, torch.arange(W, dtype=torch.int64), group=group)
            _PROBED[key] = True
        except RuntimeError:
            _PROBED[key] = False
    return _PROBED[key]


def _emulated_exchange(x: Tensor, out_splits: list[int], in_splits: list[int],
                       group: dist.ProcessGroup | None) -> Tensor:
    """all_to_all via all_gather: gather every rank's split sizes and padded rows, keep what is ours."""
    W, me = dist.get_world_size(group), dist.get_rank(group)
    splits = torch.tensor(in_splits, dtype=torch.int64)
    all_splits = [torch.empty_like(splits) for _ in range(W)]
    dist.all_gather(all_splits, splits, group=group)
    n_max = max(int(s.sum()) for s in all_splits)
    pad = x.new_zeros((n_max,) + tuple(x.shape[1:]))
    pad[: x.shape[0]] = x
    bufs = [torch.empty_like(pad) for _ in range(W)]
    dist.all_gather(bufs, pad, group=group)
    parts = []
    for s in range(W):
        start = int(all_splits[s][:me].sum())
        parts.append(bufs[s][start:start + out_splits[s]])
    return torch.cat(parts, 0)


def exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """Send ``x[rows of split r]`` to rank r; receive ``out_splits[s]`` rows from each rank s (no grad)."""
    x = x.contiguous()
    if FORCE_EMULATION or not _probe(group):
        return _emulated_exchange(x, out_splits, in_splits, group)
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup | None) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        return exchange(g, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """Differentiable uneven all-to-all over dim 0 (gradients flow back to the senders)."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def exchange_counts(send_WL: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """``send_WL[r, l]`` = rows this rank sends to rank r's local expert l; returns ``recv_WL[s, l]`` =
    rows rank s sends to this rank's local expert l (int64, one all_to_all_single with equal splits)."""
    W, L = send_WL.shape
    flat = send_WL.to(torch.int64).reshape(-1).contiguous()
    return exchange(flat, [L] * W, [L] * W, group).view(W, L)


def all_reduce_sum(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """In-place SUM all-reduce (no grad); a no-op without a group or outside torch.distributed."""
    if group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
