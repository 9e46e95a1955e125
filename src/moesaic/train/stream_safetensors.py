"""Write a safetensors file one tensor at a time, so a checkpoint larger than memory can be written.

A :class:`LazyState` maps each tensor name to its shape, dtype and a producer that makes the tensor when
it is written (a converted model's expert stacks are made from the dense FFN only then:
``moesaic convert upcycle --set stream=true``, docs/convert.md). The file is the standard safetensors
layout (8-byte little-endian header length, JSON header with ``dtype``, ``shape`` and ``data_offsets``,
then the raw little-endian bytes), so :func:`safetensors.torch.load` reads it; peak memory is one tensor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from moesaic.core.errors import ConversionError

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}

_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``F32``, ``BF16``, ...)."""
    if name not in _NAMES:
        raise ConversionError(f"safetensors dtype {name!r} is not supported here ({', '.join(sorted(_NAMES))})")
    return _NAMES[name]


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor of known shape and dtype, made by ``make()`` only when it is needed."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


#: name -> lazily made tensor, in the order the file stores them.
LazyState = dict[str, LazyTensor]


def lazy(t: Tensor) -> LazyTensor:
    """A tensor that already exists, as a :class:`LazyTensor`."""
    return LazyTensor(tuple(t.shape), t.dtype, lambda: t)


def write_lazy(f: BinaryIO, state: LazyState) -> None:
    """Write ``state`` as safetensors to the open file ``f``, making each tensor only when it is written."""
    header: dict[str, object] = {}
    offset = 0
    for name, lt in state.items():
        header[name] = {"dtype": _DTYPES[lt.dtype], "shape": list(lt.shape), "data_offsets": [offset,
                                                                                             offset + lt.nbytes]}
        offset += lt.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, lt in state.items():
        t = lt.make().detach().to("cpu").contiguous()
        if tuple(t.shape) != lt.shape or t.dtype != lt.dtype:
            raise ConversionError(f"{name}: made {tuple(t.shape)} {t.dtype}, declared {lt.shape} {lt.dtype}")
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        del t


def file_digest(path: Path, chunk: int = 1 << 20) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks into one buffer."""
    h, n = hashlib.sha256(), 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(view):
            h.update(view[:k])
            n += k
    return n, h.hexdigest()
