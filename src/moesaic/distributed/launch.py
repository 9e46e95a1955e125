"""Run a function on N local gloo processes (tests, benchmarks, the soak script).

``spawn(fn, nprocs, *args)`` starts ``nprocs`` processes with ``torch.multiprocessing.spawn``, one
thread each (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), initialises a gloo process group
through a ``file://`` store with the 60 s timeout (``MOESAIC_PG_TIMEOUT``), calls
``fn(rank, world_size, *args)`` and returns every rank's return value (through ``torch.save`` files).
If a rank raises, the others are terminated and the exception is re-raised here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moesaic.distributed.groups import init_process_group


def _entry(rank: int, fn: Callable[..., Any], nprocs: int, tmp: str, args: tuple[Any, ...]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=nprocs)
    try:
        out = fn(rank, nprocs, *args)
        torch.save(out, f"{tmp}/result_{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, nprocs, *args)`` on ``nprocs`` gloo processes; return the per-rank results."""
    with tempfile.TemporaryDirectory(prefix="moesaic_spawn_") as tmp:
        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children before torch is imported
        try:
            mp.spawn(_entry, args=(fn, nprocs, tmp, args), nprocs=nprocs, join=True)
        finally:
            if old is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = old
        return [torch.load(Path(tmp) / f"result_{r}.pt", weights_only=False) for r in range(nprocs)]


def torchrun(nproc: int, moesaic_args: list[str]) -> int:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m moesaic ARGS``; its exit code
    (non-zero when any rank fails: torchrun then stops the others)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "-m", "moesaic", *moesaic_args]
    return subprocess.run(cmd, env=env).returncode
