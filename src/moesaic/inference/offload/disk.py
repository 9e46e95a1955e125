"""The disk tier: one safetensors file per MoE layer, read through a memory map, with a hashed manifest.

Layout of a store folder (written atomically by :func:`save_expert_store`: a temporary sibling, fsynced,
then renamed)::

    manifest.json          {"format": "moesaic-expert-store", "version": 1, "layers": [...]}
    layer-000.safetensors  tensors "<e>.<name>" (expert e's slice of the stacked weight ``name``)

Each manifest layer names its module path, file, file size and sha256, expert count, per-expert shapes
and dtype, and one sha256 per expert (over its tensors' bytes in ``stacked_names()`` order).

:class:`DiskStore` maps each file (``mmap``, private, read-only use) and copies an expert's bytes from the
map into a cache slot, so the kernel pages the file in on demand (the setting of EdgeMoE: Yi et al. 2023,
and MoE-Infinity: Xue et al. 2024). Checks, each a :class:`CheckpointCorruptError` naming the file:

* on open: a missing manifest or layer file, a file whose size differs from the manifest, a header that
  does not parse or a tensor extending past the end of the file (a truncated file is detected, never read);
* ``verify="read"`` (default): an expert's bytes are hashed the first time they are read and compared to
  the manifest; ``"open"``: every file's sha256 is checked when the store opens; ``"none"``: sizes only;
* before every read: the file's size again (a file truncated after opening is refused, not faulted on).

After each read the expert's pages are released from this process's map (``MADV_DONTNEED``) with
``release_pages=True``, so the resident set holds the cache slots, not the file; :meth:`DiskStore.drop_page_cache`
asks the kernel to drop the files from the page cache (``posix_fadvise(DONTNEED)``) before a cold run.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moesaic.core.errors import CheckpointCorruptError, CheckpointError, ConfigError, OutputWriteError
from moesaic.inference.offload import mapped
from moesaic.inference.offload.aligned import DTYPES as _DTYPES
from moesaic.inference.offload.aligned import NAMES as _NAMES
from moesaic.inference.offload.aligned import write_aligned
from moesaic.inference.offload.store import ExpertStore, LayerSpec

FORMAT = "moesaic-expert-store"
MANIFEST = "manifest.json"
VERIFY = ("read", "open", "none")
#: Bytes around an expert's range also released after a read: the kernel maps up to 64 KiB of cached pages
#: around a read fault (``fault_around_bytes``).
FAULT_AROUND = 256 << 10


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _expert_hash(tensors: list[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
    return h.hexdigest()


def save_expert_store(experts_by_layer: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write every layer's experts (module path -> experts module with the experts interface) to a new folder
    ``path`` (refused if it exists: a folder the user names is never overwritten). Returns the folder."""
    out = Path(path)
    if out.exists():
        raise ConfigError("offload.dir", str(out), "exists; the expert store is written to a new folder")
    tmp = out.parent / f".{out.name}.store-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        layers = []
        for i, (layer, ex) in enumerate(experts_by_layer.items()):
            names = list(ex.stacked_names())
            tensors: dict[str, Tensor] = {}
            hashes = []
            for e in range(ex.num_experts):
                st = ex.expert_state(e)
                parts = [st[n].detach().contiguous().cpu() for n in names]
                tensors.update({f"{e}.{n}": t for n, t in zip(names, parts, strict=True)})
                hashes.append(_expert_hash(parts))
            fname = f"layer-{i:03d}.safetensors"
            write_aligned(tmp / fname, tensors, metadata={"layer": layer})
            first = ex.expert_state(0)
            layers.append({"name": layer, "file": fname, "bytes": (tmp / fname).stat().st_size,
                           "sha256": _sha256_file(tmp / fname), "num_experts": ex.num_experts,
                           "tensors": {n: list(first[n].shape) for n in names},
                           "dtype": _NAMES[first[names[0]].dtype], "experts_sha256": hashes})
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "version": 1, "layers": layers}, indent=1))
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputWriteError(f"{out}: cannot write the expert store ({e})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class _LayerFile:
    """One mapped layer file: the map, the data start and each tensor's byte range."""

    def __init__(self, path: Path, entry: dict[str, Any]):
        self.path = path
        if not path.is_file():
            raise CheckpointCorruptError(f"{path}: expert file missing (layer {entry['name']})")
        self.size = int(entry["bytes"])
        actual = path.stat().st_size
        if actual != self.size:
            raise CheckpointCorruptError(f"{path}: {actual} bytes, the manifest says {self.size} "
                                         f"({'truncated' if actual < self.size else 'grown'}); refusing to read it")
        self.fd = os.open(path, os.O_RDONLY)
        try:
            head = os.pread(self.fd, 8, 0)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= self.size - 8:
                raise CheckpointCorruptError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(os.pread(self.fd, n, 8))
        except (ValueError, UnicodeDecodeError) as e:
            os.close(self.fd)
            raise CheckpointCorruptError(f"{path}: unreadable safetensors header ({e})") from e
        self.data0 = 8 + n
        self.ranges: dict[str, tuple[int, int]] = {}
        for key, v in header.items():
            if key == "__metadata__":
                continue
            a, b = (int(x) for x in v["data_offsets"])
            if not 0 <= a <= b or self.data0 + b > self.size:
                os.close(self.fd)
                raise CheckpointCorruptError(f"{path}: tensor {key} ends at byte {self.data0 + b} past the end of "
                                             f"the file ({self.size} bytes): truncated")
            self.ranges[key] = (self.data0 + a, self.data0 + b)
        self.map = mmap.mmap(self.fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class DiskStore(ExpertStore):
    """Experts in per-layer safetensors files, read through ``mmap`` (see the module docstring)."""

    tier = "disk"

    def __init__(self, path: str | os.PathLike[str], verify: str = "read", release_pages: bool = True):
        if verify not in VERIFY:
            raise ConfigError("offload.verify", verify, f"must be one of {', '.join(VERIFY)}")
        self.path, self.verify, self.release_pages = Path(path), verify, release_pages
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise CheckpointCorruptError(f"{self.path}: no {MANIFEST}; not an expert store (write one with "
                                         "save_expert_store or `moesaic generate --offload-dir`)")
        try:
            manifest = json.loads(mpath.read_text())
            assert manifest.get("format") == FORMAT, f"format is {manifest.get('format')!r}, not {FORMAT!r}"
            entries = manifest["layers"]
        except (ValueError, KeyError, AssertionError) as e:
            raise CheckpointCorruptError(f"{mpath}: not an expert-store manifest ({e})") from e
        self.entries = {x["name"]: x for x in entries}
        self.files: dict[str, _LayerFile] = {}
        specs = {}
        try:
            for x in entries:
                self.files[x["name"]] = f = _LayerFile(self.path / x["file"], x)
                if verify == "open" and _sha256_file(f.path) != x["sha256"]:
                    raise CheckpointCorruptError(f"{f.path}: sha256 does not match the manifest (layer {x['name']})")
                shapes = {n: tuple(s) for n, s in x["tensors"].items()}
                for ex in range(x["num_experts"]):
                    for n in shapes:
                        if f"{ex}.{n}" not in f.ranges:
                            raise CheckpointCorruptError(f"{f.path}: expert {ex} tensor {n} missing "
                                                         f"(layer {x['name']})")
                specs[x["name"]] = LayerSpec(x["name"], int(x["num_experts"]), shapes, _DTYPES[x["dtype"]])
        except BaseException:
            self.close()
            raise
        self.verified: set[tuple[str, int]] = set()
        super().__init__(specs)

    def _file_for(self, layer: str, e: int) -> _LayerFile:
        """The layer's file, after checking the expert index and that the file still has its size."""
        spec, f = self.spec(layer), self.files[layer]
        if not 0 <= e < spec.num_experts:
            raise ConfigError(f"{layer}.expert", e, f"must be in [0, {spec.num_experts})")
        if os.fstat(f.fd).st_size != f.size:
            raise CheckpointCorruptError(f"{f.path}: changed size since it was opened ({os.fstat(f.fd).st_size} "
                                         f"bytes, manifest {f.size}); refusing to read expert {e} of {layer}")
        return f

    def _verified(self, layer: str, e: int, f: _LayerFile, h: Any) -> None:
        if h.hexdigest() != self.entries[layer]["experts_sha256"][e]:
            raise CheckpointCorruptError(f"{f.path}: expert {e} of {layer} does not match its sha256 in the "
                                         "manifest; refusing to use it")
        self.verified.add((layer, e))

    def mappable(self, layer: str) -> bool:
        """Whether cache slots can map this layer's experts (zero copy, :mod:`.mapped`): Linux, and every expert
        tensor at a page-aligned offset with a whole number of pages (stores written by this version)."""
        f = self.files[layer]
        return mapped.supported() and all(mapped.aligned(a, b - a) for k, (a, b) in f.ranges.items()
                                           if not k.startswith("__"))

    def new_slots(self, layer: str, capacity: int, device: torch.device | str, zero_copy: bool = True) -> Any:
        """Mapped slots when ``zero_copy``, the slots are on the CPU and the layer is :meth:`mappable`;
        otherwise slots in RAM that reads copy into."""
        if zero_copy and torch.device(device).type == "cpu" and self.mappable(layer):
            spec = self.spec(layer)
            try:
                return mapped.MappedSlots(spec.shapes, spec.dtype, capacity)
            except OSError:  # no address space to reserve: slots that copy work the same, bit for bit
                pass
        return super().new_slots(layer, capacity, device, zero_copy)

    def load_slot(self, layer: str, e: int, slots: Any, slot: int, ahead: bool = False) -> int:
        """Map expert e's pages into a mapped slot (verified on first use like a read), or copy into a slot.
        A mapping ahead of need (prefetch) of tensors under 2 MiB starts the kernel's read of the pages and
        leaves faulting them in to the forward that uses them (a wrong prediction then costs no page-table
        work); tensors of 2 MiB or more are populated in either case, since their huge-page entries cost
        microseconds (:mod:`.mapped`)."""
        if not isinstance(slots, mapped.MappedSlots):
            return super().load_slot(layer, e, slots, slot, ahead)
        f = self._file_for(layer, e)
        try:
            n = slots.map(slot, f.fd, {name: f.ranges[f"{e}.{name}"][0] for name in slots.buffers},
                          populate=not ahead)
        except OSError as err:
            raise CheckpointError(f"{f.path}: cannot map expert {e} of {layer} into a cache slot ({err}); "
                                  "--offload-copy (OffloadConfig.zero_copy=False) reads it instead") from err
        if self.verify == "read" and (layer, e) not in self.verified:
            h = hashlib.sha256()
            for name in slots.buffers:
                h.update(slots.slot_memory(slot, name))
            self._verified(layer, e, f, h)
        return n

    def read_into(self, layer: str, e: int, out: dict[str, Tensor]) -> int:
        spec, f = self.spec(layer), self._file_for(layer, e)
        check = self.verify == "read" and (layer, e) not in self.verified
        h = hashlib.sha256() if check else None
        n, lo, hi = 0, f.size, 0
        for name, dst in out.items():
            a, b = f.ranges[f"{e}.{name}"]
            src = torch.frombuffer(f.map, dtype=spec.dtype, count=(b - a) // dst.element_size(), offset=a)
            if h is not None:
                h.update(memoryview(f.map)[a:b])
            dst.copy_(src.view(dst.shape))
            n, lo, hi = n + (b - a), min(lo, a), max(hi, b)
        if h is not None:
            self._verified(layer, e, f, h)
        if self.release_pages and hi > lo:  # with a margin: a read fault also maps neighbours (fault-around)
            start = max(0, lo - FAULT_AROUND) // mmap.PAGESIZE * mmap.PAGESIZE
            f.map.madvise(mmap.MADV_DONTNEED, start, min(f.size, hi + FAULT_AROUND) - start)
        return n

    def drop_page_cache(self) -> None:
        """Drop this store's files from the page cache (``posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)``) and from
        this process's map, so the next reads come from the disk (a cold start)."""
        for f in self.files.values():
            f.map.madvise(mmap.MADV_DONTNEED, 0, f.size)
            os.posix_fadvise(f.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def page_cache_bytes(self) -> int:
        """Bytes of this store's files in the kernel's page cache now (``mincore``; not the process's memory)."""
        return sum(mapped.page_cache_bytes(f.fd, f.size) for f in self.files.values())

    def mapped_bytes(self, field: str = "Rss") -> int:
        """Bytes of this store's files mapped into this process now (``Rss`` of the maps in /proc/self/smaps);
        ``field="FilePmdMapped"``: the part of them mapped with 2 MiB entries (:mod:`.mapped`)."""
        paths = {str(f.path.resolve()) for f in self.files.values()}
        key = field + ":"
        total, current = 0, False
        try:
            with open("/proc/self/smaps") as fh:
                for line in fh:
                    parts = line.split()
                    if parts and not parts[0].endswith(":"):  # a mapping's header line: range perms ... path
                        current = len(parts) >= 6 and parts[5] in paths
                    elif current and line.startswith(key):
                        total += int(line.split()[1]) * 1024
        except OSError:
            return 0
        return total

    def close(self) -> None:
        for f in getattr(self, "files", {}).values():
            f.close()
        self.files = {}
