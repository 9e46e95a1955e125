"""Timing and memory measurement for the benchmarks.

Time: the median of ``repeats`` runs after ``warmup`` runs, implementations interleaved (each round
runs every implementation once, in a shuffled order), so a neighbour process that slows the machine for
a while hits every implementation alike.

On a CPU shared with other processes, ``clock="cpu"`` (``--clock cpu``) times with the process CPU time:
with one intra-op thread (``OMP_NUM_THREADS=1``) that is the compute time of the call without the time
the scheduler gave to other processes (cache and memory-bandwidth contention still count). With several
threads it sums their CPU time, so it measures work, not latency.

Memory (``peak``): the allocator growth during one forward+backward, above what was allocated before it,
minus the parameter gradients (which every layer with the same weights must allocate). On CUDA this is
``torch.cuda.max_memory_allocated``. On CPU there is no allocator statistic, so the PyTorch profiler
records every allocation and free (``profile_memory=True``): each op's own net allocation is placed at its
end, each free at its time, and the peak of the running sum is taken (so a temporary allocated and freed
inside one op is not seen). ``saved`` is a second, exact number: the bytes of the distinct storages that
autograd keeps for backward at the end of the forward (``torch.autograd.graph.saved_tensors_hooks``),
i.e. the activation memory.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     device: torch.device | None = None, seed: int = 0, clock: str = "wall") -> dict[str, float]:
    """Median seconds per call of every function, interleaved and shuffled per round. ``clock="cpu"``
    reads the process CPU time instead of the wall clock (see the module docstring)."""
    dev = device or torch.device("cpu")
    now = time.process_time if clock == "cpu" else time.perf_counter
    rng = random.Random(seed)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        rng.shuffle(names)
        for n in names:
            _sync(dev)
            t0 = now()
            fns[n]()
            _sync(dev)
            times[n].append(now() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; BLAS kernels, and so speed ratios, differ between CPU vendors)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_header(clock: str = "wall", extra: str = "") -> str:
    """One line: torch threads, C allocator, clock (``cpu`` labelled as process CPU time), load average."""
    from moesaic.core.allocator import allocator_description

    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    what = "wall clock" if clock == "wall" else "PROCESS CPU TIME (--clock cpu: not wall-clock latency)"
    return (f"# threads={torch.get_num_threads()} of {os.cpu_count()} cores; allocator: {allocator_description()}; "
            f"clock: {what}; load average: {load}; CPU: {cpu_model()}" + (f"; {extra}" if extra else ""))


def saved_bytes(fn: Callable[[], Tensor]) -> tuple[int, Tensor]:
    """Bytes of distinct storages saved for backward by ``fn()`` (exact activation memory)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            s = t.untyped_storage()
            seen.setdefault(s.data_ptr(), s.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def peak_growth(fn: Callable[[], None], device: torch.device) -> int:
    """Peak allocator growth (bytes) while ``fn()`` runs (method in the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    for e in prof.events():
        b = e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage
        if b:
            events.append((e.time_range.start if e.name == "[memory]" else e.time_range.end, b))
    cur = peak = 0
    for _, b in sorted(events):
        cur += b
        peak = max(peak, cur)
    return peak
