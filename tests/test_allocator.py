"""Importing moesaic tunes glibc malloc (no mmap for large blocks, no trimming per free), and
``MOESAIC_MALLOC=default`` leaves it alone: checked in fresh processes with glibc's own counters."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import ctypes, torch
import moesaic
from moesaic.core.allocator import allocator_description

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblks  # blocks mapped while torch was imported, before moesaic tuned malloc
x = torch.empty(16 << 20, dtype=torch.uint8)  # 16 MiB: above glibc's default mmap threshold
x.fill_(1)
print(libc.mallinfo2().hblks - before)
del x
print(allocator_description())
"""


def probe(**env: str) -> tuple[int, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("MOESAIC_MALLOC", "LD_PRELOAD")} | env
    out = subprocess.run([sys.executable, "-c", PROBE], env=e, capture_output=True, text=True, check=True).stdout
    mmapped, desc = out.strip().splitlines()[-2:]
    return int(mmapped), desc


def test_import_moesaic_serves_large_blocks_from_the_heap():
    mmapped, desc = probe()
    assert mmapped == 0 and "moesaic-tuned" in desc


def test_moesaic_malloc_default_switches_it_off():
    mmapped, desc = probe(MOESAIC_MALLOC="default")
    assert mmapped >= 1 and "defaults" in desc
