"""A safetensors file whose tensors start at page-aligned offsets, so each can be memory-mapped on its own.

The safetensors format (https://huggingface.co/docs/safetensors): 8 bytes of header length N (little
endian), N bytes of JSON header (``{"name": {"dtype", "shape", "data_offsets": [a, b]}, "__metadata__":
{...}}``, offsets relative to the data), then the data, every byte belonging to exactly one tensor. The
``safetensors`` library writes tensors back to back after a header padded to 8 bytes, so a tensor's
offset is generally not a multiple of the page size and it cannot be mapped at a chosen address
(:mod:`moesaic.inference.offload.mapped`). :func:`write_aligned` writes the same format with two
differences that every reader accepts: the header JSON is padded with spaces so the data starts on a page
boundary, and where a tensor would not start on one, a ``__pad__.<i>`` ``U8`` tensor fills the gap (the
format forbids holes). Tensors of at least 2 MiB start on a 2 MiB boundary of the file (the data then starts
on one) where the gap costs at most 1/4 of the tensor's bytes, so that a slot mapped at a 2 MiB-aligned
address can use huge-page entries over the page cache (:mod:`moesaic.inference.offload.mapped`); a tensor for
which the gap would cost more stays page-aligned. The file loads with ``safetensors.safe_open`` like any
other (tested); the padding tensors are ignored by the expert store.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from moesaic.inference.offload.mapped import HUGE, PAGE

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32}
NAMES = {v: k for k, v in DTYPES.items()}
PAD_PREFIX = "__pad__."


#: A tensor is put on a ``large`` boundary only if the gap costs at most 1/this of its bytes (so a file of
#: tensors just over 2 MiB does not nearly double; such a tensor stays page-aligned and maps with 4 KiB entries).
MAX_PAD_FRACTION = 4


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _layout(tensors: dict[str, Tensor], align: int,
            large: int) -> tuple[list[tuple[str, Tensor | int]], dict[str, object]]:
    """The write order (tensors and padding byte counts) and the header entries, offsets from the data."""
    order: list[tuple[str, Tensor | int]] = []
    header: dict[str, object] = {}
    pos = 0
    for name, t in tensors.items():
        n = _nbytes(t)
        a = large if n >= large and -pos % large <= n // MAX_PAD_FRACTION else align
        if pos % a:
            gap = a - pos % a
            pad = f"{PAD_PREFIX}{len(order)}"
            header[pad] = {"dtype": "U8", "shape": [gap], "data_offsets": [pos, pos + gap]}
            order.append((pad, gap))
            pos += gap
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        order.append((name, t))
        pos += n
    return order, header


def write_aligned(path: str | os.PathLike[str], tensors: dict[str, Tensor], metadata: dict[str, str] | None = None,
                  align: int = PAGE, large: int = HUGE) -> None:
    """Write ``tensors`` (in this order, CPU, contiguous or not) as a safetensors file at ``path`` with every
    tensor at an ``align``-byte aligned file offset, and tensors of at least ``large`` bytes at a ``large``-byte
    aligned one where that gap is at most 1/:data:`MAX_PAD_FRACTION` of them (module docstring), then fsync it."""
    order, header = _layout(tensors, align, large)
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    start = large if any(_nbytes(t) >= large for t in tensors.values()) else align
    n = len(text) + (-(8 + len(text)) % start)  # pad so that the data (at 8 + N) starts on a boundary
    with open(Path(path), "wb") as f:
        f.write(n.to_bytes(8, "little"))
        f.write(text + b" " * (n - len(text)))
        for _, item in order:
            if isinstance(item, int):
                f.write(bytes(item))
            else:
                f.write(item.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy().data)
        f.flush()
        os.fsync(f.fileno())
