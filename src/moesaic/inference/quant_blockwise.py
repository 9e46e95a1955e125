"""Dequantize in the matmul, block by block, for one decode token.

A quantized expert's weight ``W`` (``[O, I]``) is normally dequantized whole before its matmul: for a decode
token that writes and reads back 4 bytes per weight (34.6 MB per expert of the offloading benchmark model)
to multiply one row. Here the rows of ``W`` are dequantized a block at a time (about :data:`BLOCK_BYTES`) into
one reused buffer, and each block is multiplied while it is in the cache, so the full-precision weight never
reaches memory: the matmul reads the int8 or int4 codes and their scales only (the blocked weight-only kernels
of QMoE, Frantar & Alistarh 2023, and of llama.cpp's quantized matrix-vector products, with PyTorch ops).

Exactness: :class:`moesaic.inference.quant.QuantizedExperts` computes, bit for bit, what the fp32 experts
compute with the dequantized weights. A decode token's fp32 expert runs ``split_linear(x, W)`` (which is
``F.linear(x, W)`` bitwise), so the blocks' products, concatenated, must equal ``F.linear(x, W)``. That holds
when the kernel's reduction over ``I`` does not depend on how many output rows it is given; as in
:mod:`moesaic.core.split_linear`, it is probed once per (dtype, O, I, rows per block) on random operands, and
where it fails the caller dequantizes the whole expert as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from moesaic.core.split_linear import split_linear

#: Bytes of dequantized weight per block. Measured on the 4 GB benchmark model (2 threads, AMD EPYC, 32 MB
#: L3), int8 / int4 decode tok/s: 1 MiB 19.2 / 10.3, 2 MiB 23.5 / 14.1, 4 MiB 27.7 / 15.4, 8 MiB 22.8 / 13.9.
#: Smaller blocks pay more per-op overhead, larger ones leave the cache (docs/benchmarks.md).
BLOCK_BYTES = 4 << 20
#: Rows per block are a multiple of this (so :func:`split_linear` can split a block over the threads).
ROW_MULTIPLE = 32
#: (dtype, O, I, rows per block, threads) -> whether the blocks' products equal F.linear bitwise (probed once
#: each; the thread count decides how split_linear splits a block).
_BITWISE: dict[tuple[torch.dtype, int, int, int, int], bool] = {}

#: ``fill(a, b, out)``: write rows ``a:b`` of the dequantized weight into ``out`` (``[b - a, I]``).
Fill = Callable[[int, int, Tensor], None]


def block_rows(n_in: int, dtype: torch.dtype) -> int:
    """Rows of ``W`` per block for ``n_in`` input features."""
    per_row = n_in * torch.empty((), dtype=dtype).element_size()
    return max(ROW_MULTIPLE, BLOCK_BYTES // per_row // ROW_MULTIPLE * ROW_MULTIPLE)


def _blocks(x_1I: Tensor, n_out: int, rows: int, fill: Fill, buf: Tensor) -> Tensor:
    y_1O = x_1I.new_empty(1, n_out)
    for a in range(0, n_out, rows):
        b = min(n_out, a + rows)
        w = buf[:(b - a) * x_1I.shape[1]].view(b - a, x_1I.shape[1])
        fill(a, b, w)
        y_1O[:, a:b] = split_linear(x_1I, w)
    return y_1O


def bitwise(dtype: torch.dtype, n_out: int, n_in: int, rows: int) -> bool:
    """Whether :func:`blockwise_linear` equals ``F.linear`` bitwise for this shape (probed once, cached)."""
    key = (dtype, n_out, n_in, rows, torch.get_num_threads())
    ok = _BITWISE.get(key)
    if ok is None:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(1, n_in, generator=g).to(dtype), torch.randn(n_out, n_in, generator=g).to(dtype)
        buf = torch.empty(rows * n_in, dtype=dtype)
        def fill(a: int, b: int, out: Tensor) -> None:
            out.copy_(w[a:b])

        got = _blocks(x, n_out, rows, fill, buf)
        ok = _BITWISE[key] = torch.equal(got, F.linear(x, w))
    return ok


def blockwise_linear(x_1I: Tensor, n_out: int, fill: Fill, buf: Tensor) -> Tensor:
    """``F.linear(x_1I, W)`` for one row, ``W`` (``[n_out, I]``) produced block by block by ``fill`` into ``buf``
    (at least :func:`block_rows` x I elements). The caller checks :func:`bitwise` first."""
    return _blocks(x_1I, n_out, block_rows(x_1I.shape[1], x_1I.dtype), fill, buf)
