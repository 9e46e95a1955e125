"""Run a function on N local gloo processes (tests, benchmarks, the soak script).

``spawn(fn, nprocs, *args)`` starts ``nprocs`` processes with ``torch.multiprocessing.spawn``, one
thread each (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), initialises a gloo process group
through a ``file://`` store with the 60 s timeout (``MOESAIC_PG_TIMEOUT``), calls
``fn(rank, world_size, *args)`` and returns every rank's return value (through ``torch.save`` files).
If a rank raises, the others are terminated and the exception is re-raised here.
"""

from __future__ import annotations

import os
import signal
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


#: What each worker runs after ``torch.distributed.run``'s own arguments (the chaos harness points it at its
#: fault launcher; nothing in the package changes it).
WORKER: list[str] = ["-m", "moesaic"]


#: Deaths by which a rank's peers react to a lost rank (gloo aborts when a collective loses its peer) or by which
#: torchrun stops the others: a rank that died so is the root cause only where nothing else failed as early.
_CONSEQUENCES = (signal.SIGABRT, signal.SIGTERM)


def first_failure(failures: dict[int, Any]) -> int:
    """The rank whose failure caused the others, from ``ChildFailedError.failures`` (rank -> ProcessFailure).

    torchrun's own choice (``get_first_failure``) is the smallest timestamp, but a rank that died by a signal
    leaves no error file and gets the time torchrun noticed it, in whole seconds: a rank killed from outside
    and a peer that aborted because the collective lost it are usually noticed in the same second, and the
    tie then goes to the lower rank. Here, among the failures of the earliest second, one that is not an abort
    or a stop (``SIGABRT``, ``SIGTERM``) comes first; then the lowest rank."""
    first = min(f.timestamp for f in failures.values())
    tied = sorted(r for r, f in failures.items() if f.timestamp == first)
    causes = [r for r in tied if not (failures[r].exitcode < 0 and -failures[r].exitcode in _CONSEQUENCES)]
    return (causes or tied)[0]


def torchrun(nproc: int, moesaic_args: list[str]) -> int:
    """``torchrun --standalone --nproc-per-node N -m moesaic ARGS``, run in this process; its exit code.

    When a rank fails, torchrun stops the others (SIGTERM, then SIGKILL); its ``ChildFailedError`` (a
    traceback) becomes a one-line :class:`~moesaic.core.errors.RankFailedError` naming the first rank that
    failed (:func:`first_failure`) and how (an exit code, or the signal that killed it)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from moesaic.core.errors import RankFailedError

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
                                         *WORKER, *moesaic_args])
    try:
        run(args)
    except ChildFailedError as e:
        rank = first_failure(e.failures)
        f = e.failures[rank]
        how = (f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"exited with {f.exitcode}")
        others = [r for r in e.failures if r != rank]
        raise RankFailedError(f"rank {rank} of {nproc} {how} (pid {f.pid}); torchrun stopped the other ranks"
                              + (f" ({', '.join(map(str, others))} failed too)" if others else "")
                              + "; only checkpoints published before it remain") from None
    return 0
