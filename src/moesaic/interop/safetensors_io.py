"""Sharded safetensors in and out (the Hugging Face layout), with complete-or-fail loading.

A Hugging Face weight folder holds either one ``model.safetensors`` or several shards listed by
``model.safetensors.index.json`` (``{"weight_map": {key: file}}``). :class:`WeightReader` opens either,
checks that every shard the index names exists and holds exactly the keys the index gives it (a missing
shard fails with the list of missing keys; docs/hf.md, Safety rules), and reads tensors lazily. Pickle
files (``pytorch_model.bin``) are refused: unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from moesaic.core.errors import ConversionError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def short_list(keys: Iterable[str], n: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


class WeightReader:
    """Read-only view of the tensors of a safetensors folder (single file or index + shards)."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConversionError(f"{self.folder}: not a directory")
        self.key_file: dict[str, str] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        if (self.folder / INDEX).is_file():
            self._open_index()
        elif (self.folder / SINGLE).is_file():
            self._scan(SINGLE)
        else:
            pickles = sorted(p.name for pat in ("*.bin", "*.pt", "*.pth") for p in self.folder.glob(pat))
            why = (f"only pickle weights found ({', '.join(pickles)}); convert them to safetensors first, "
                   "pickle is never loaded" if pickles else f"no {SINGLE} or {INDEX}")
            raise ConversionError(f"{self.folder}: {why}")
        self._handles: dict[str, safe_open] = {}

    def _scan(self, fname: str) -> set[str]:
        path = self.folder / fname
        try:
            with safe_open(str(path), "pt") as f:
                keys = set(f.keys())
                self.metadata[fname] = dict(f.metadata() or {})
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad header
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
        for k in keys:
            if k in self.key_file:
                raise ConversionError(f"{path}: tensor {k!r} is also in {self.key_file[k]}")
            self.key_file[k] = fname
        return keys

    def _open_index(self) -> None:
        try:
            index = json.loads((self.folder / INDEX).read_text())
            weight_map: dict[str, str] = index["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConversionError(f"{self.folder / INDEX}: not a valid safetensors index ({e})") from e
        by_file: dict[str, set[str]] = {}
        for k, f in weight_map.items():
            by_file.setdefault(f, set()).add(k)
        missing_files = sorted(f for f in by_file if not (self.folder / f).is_file())
        if missing_files:
            lost = set().union(*(by_file[f] for f in missing_files))
            raise ConversionError(f"{self.folder}: missing shard(s) {', '.join(missing_files)}; "
                                  f"{len(lost)} tensors cannot be loaded: {short_list(lost)}")
        for fname, want in sorted(by_file.items()):
            have = self._scan(fname)
            if have != want:
                raise ConversionError(
                    f"{self.folder / fname}: does not match {INDEX}; missing: {short_list(want - have) or '-'}; "
                    f"not in the index: {short_list(have - want) or '-'}")

    def keys(self) -> list[str]:
        return sorted(self.key_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_file

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.key_file[key]).get_slice(key).get_shape())

    def get(self, key: str) -> Tensor:
        return self._handle(self.key_file[key]).get_tensor(key)

    def read(self, key: str) -> Tensor:
        """The tensor ``key``, its shard opened for this read only (streamed conversion keeps no file mapped)."""
        from moesaic.train.lazy_load import read_tensor

        return read_tensor(self.folder / self.key_file[key], key)

    def file_metadata(self, key: str) -> dict[str, str]:
        return self.metadata.get(self.key_file[key], {})

    def _handle(self, fname: str) -> safe_open:
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.folder / fname), "pt")
        return self._handles[fname]


def write_sharded(tensors: dict[str, Tensor], folder: str | os.PathLike[str], *, max_shard_bytes: int = 5 * 2**30,
                  metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``tensors`` as one file or as shards plus an index, in key order. Returns the file names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous().clone()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    for stale in [*folder.glob("model-*-of-*.safetensors"), folder / SINGLE, folder / INDEX]:
        if stale.exists():
            stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE), metadata=meta)
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total, **(metadata or {})},
                                            "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    return names


def tensor_bytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


