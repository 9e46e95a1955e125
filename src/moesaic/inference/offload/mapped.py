"""Zero-copy cache slots: slot buffers whose pages are the expert store file's own pages.

A cache slot normally holds a copy of an expert (read from the store into RAM). When the store file lays
each expert tensor out at a page-aligned offset (:func:`moesaic.inference.offload.aligned.write_aligned`)
and the slots live on the CPU, a slot can instead *map* the expert's byte range of the file at the slot's
address (``mmap(MAP_FIXED | MAP_PRIVATE)`` over a reserved region), so loading an expert costs a remap and
the page faults of its pages rather than a copy of every byte: the setting of llama.cpp's mmap loading and
of EdgeMoE (Yi et al. 2023, experts paged in from storage on demand). The slot buffers stay one stacked
tensor per weight (``[S, H, D]``, ``[S, D, F]``), so every experts backend computes on them unchanged and
the results are the same bits as from copied slots.

* :class:`MappedSlots` reserves one anonymous region per stacked tensor (``MAP_NORESERVE``; untouched
  slots cost no memory) and maps an expert into a slot with :meth:`MappedSlots.map`, then asks the kernel
  to read the range ahead (``MADV_WILLNEED``; ``MADV_HUGEPAGE`` for tensors of 2 MiB or more, below) and to
  map its pages now (``MADV_POPULATE_READ``, Linux 5.14+; elsewhere the first compute faults them in).
  Remapping a slot unmaps the previous expert's pages from the process; they stay in the kernel's page
  cache until memory pressure evicts them.
* **Huge-page mappings.** Each region starts on a 2 MiB boundary and, for experts of at least 2 MiB, each
  slot's stride is rounded up to a multiple of 2 MiB (the buffer is then a strided view: every slot is
  contiguous, the gap between slots is never touched). A store written by this version puts every expert
  tensor at a 2 MiB-aligned file offset (:func:`moesaic.inference.offload.aligned.write_aligned`), so a
  slot's address and its file offset agree modulo 2 MiB, and where the page cache holds the file in 2 MiB
  folios (large folios: ext4 since Linux 6.16, XFS, tmpfs) the kernel maps each 2 MiB with one page-table
  entry instead of 512 (``FilePmdMapped`` in /proc/self/smaps). The slots ask for such folios on a cold
  read (``MADV_HUGEPAGE``; ``MADV_WILLNEED``'s readahead would fill 4 KiB folios). Measured on a 6.18 kernel,
  ext4: mapping and populating a 22 MiB expert tensor from the page cache takes 0.03 ms with 2 MiB entries
  against 0.15-1 ms with 4 KiB ones. Where the kernel or file system cannot, the same mapping falls back to
  4 KiB entries with the same bytes.
* The regions are unmapped when the last tensor viewing them is freed (a finalizer on the buffer object
  that the tensors keep alive), never under a live tensor.
* :func:`page_cache_bytes` reports how much of a file the page cache holds (``mincore``), so benchmarks can
  show the memory the kernel spends besides the process's own.

Caveat (as for any memory-mapped weights): the file must not be truncated or rewritten while a model
maps it; the kernel answers an access to a truncated page with SIGBUS. The store checks the file size
before every mapping, as before every copy. Linux only; elsewhere :func:`supported` is False and the
slots copy.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import weakref

import torch
from torch import Tensor

PAGE = mmap.PAGESIZE
HUGE = 2 << 20  # the PMD size of x86-64 and of arm64 with 4 KiB pages: slot and file alignment (module docstring)
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FIXED, _MAP_NORESERVE = 0x10, 0x4000  # Linux values (x86-64 and arm64)
_MADV_WILLNEED, _MADV_HUGEPAGE, _MADV_POPULATE_READ = 3, 14, 22
_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
_POPULATE_OK = True  # set False after the first EINVAL (kernels before 5.14)


def supported() -> bool:
    """Whether slots can map file pages here (Linux with a usable libc)."""
    return _LIBC is not None


def _check(ret: int | None, what: str) -> int:
    if ret is None or ret == _FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _unmap(addr: int, size: int) -> None:
    if _LIBC is not None:
        _LIBC.munmap(addr, size)


def aligned(offset: int, nbytes: int) -> bool:
    """Whether a byte range can be mapped at a slot: page-aligned start and a whole number of pages."""
    return offset % PAGE == 0 and nbytes % PAGE == 0 and nbytes > 0


class MappedSlots:
    """``capacity`` slots per stacked tensor in reserved address ranges (see the module docstring).

    ``shapes``: tensor name -> per-expert shape (each expert's bytes must be a whole number of pages);
    ``buffers``: name -> ``[capacity, *shape]`` tensor over the region (slot ``s`` at ``base + s * stride``;
    contiguous when the stride is the expert's size)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, capacity: int):
        assert _LIBC is not None, "mapped slots need Linux (check supported() first)"
        size = torch.empty((), dtype=dtype).element_size()
        self.capacity = capacity
        self.slot_bytes: dict[str, int] = {}
        self.stride: dict[str, int] = {}
        self.base: dict[str, int] = {}
        self.buffers: dict[str, Tensor] = {}
        for name, shape in shapes.items():
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * size
            if nbytes % PAGE:
                raise ValueError(f"{name}: {nbytes} bytes per expert is not a whole number of pages")
            stride = -(-nbytes // HUGE) * HUGE if nbytes >= HUGE else nbytes
            total = stride * capacity + HUGE  # room to start on a 2 MiB boundary
            start = _check(_LIBC.mmap(None, total, _PROT_RW,
                                      mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0),
                           f"reserving {total} bytes of slots for {name}")
            addr = -(-start // HUGE) * HUGE
            span = stride * (capacity - 1) + nbytes
            raw = (ctypes.c_char * span).from_address(addr)
            weakref.finalize(raw, _unmap, start, total)  # when the last tensor over it is gone
            flat = torch.frombuffer(raw, dtype=dtype, count=span // size)
            self.buffers[name] = flat.as_strided((capacity, numel), (stride // size, 1)).view(capacity, *shape)
            self.slot_bytes[name], self.stride[name], self.base[name] = nbytes, stride, addr

    def map(self, slot: int, fd: int, offsets: dict[str, int], populate: bool = True) -> int:
        """Map each tensor's file range (``offsets``: name -> page-aligned file offset) into ``slot``, start
        the kernel's read of it, and (``populate``) fault its pages in now; the bytes mapped. Tensors of at
        least 2 MiB are always populated: with huge-page entries that costs microseconds from the page cache,
        and from the disk it is the read itself (in 2 MiB folios, which ``MADV_WILLNEED``'s readahead would
        not give)."""
        assert _LIBC is not None
        global _POPULATE_OK
        n = 0
        for name, off in offsets.items():
            nbytes = self.slot_bytes[name]
            addr = self.base[name] + slot * self.stride[name]
            _check(_LIBC.mmap(addr, nbytes, _PROT_RW, mmap.MAP_PRIVATE | _MAP_FIXED, fd, off),
                   f"mapping {name} of slot {slot}")
            huge = nbytes >= HUGE
            if huge:  # a cold fault reads 2 MiB folios (readahead of WILLNEED would fill 4 KiB ones)
                _LIBC.madvise(addr, nbytes, _MADV_HUGEPAGE)
            else:
                _LIBC.madvise(addr, nbytes, _MADV_WILLNEED)
            if (populate or huge) and _POPULATE_OK and _LIBC.madvise(addr, nbytes, _MADV_POPULATE_READ) != 0:
                _POPULATE_OK = ctypes.get_errno() != 22  # EINVAL: an older kernel; pages fault in on use
            n += nbytes
        return n

    def slot_memory(self, slot: int, name: str) -> memoryview:
        """The bytes of one tensor of a slot (for hashing what was mapped)."""
        nbytes = self.slot_bytes[name]
        addr = self.base[name] + slot * self.stride[name]
        return memoryview((ctypes.c_char * nbytes).from_address(addr)).cast("B")


def page_cache_bytes(fd: int, size: int) -> int:
    """Bytes of the file ``fd`` (``size`` bytes) that the kernel's page cache holds now (``mincore`` over a
    temporary shared mapping); 0 where it cannot be asked."""
    if _LIBC is None or size <= 0:
        return 0
    addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _FAILED:
        return 0
    try:
        pages = (size + PAGE - 1) // PAGE
        vec = ctypes.create_string_buffer(pages)
        if _LIBC.mincore(addr, size, vec) != 0:
            return 0
        return sum(b & 1 for b in vec.raw) * PAGE
    finally:
        _LIBC.munmap(addr, size)
