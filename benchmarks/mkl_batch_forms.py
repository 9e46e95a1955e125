"""Probe: would one MKL ``cblas_sgemm_batch`` call per projection beat the loop of ``torch.mm`` on CPU?

PyTorch's CPU build has no batched matmul for groups of unequal size (``torch._grouped_mm`` on CPU loops
over ``mm``). PyTorch's x86 wheels link MKL statically and export ``cblas_sgemm_batch`` from
``libtorch_cpu``, so it can be reached with :mod:`ctypes` (no extra package, no compiler). This script times
the four row forms of an expert FFN's forward and backward (``up fwd`` x W_up^T, ``down fwd`` a W_down^T,
``down dx`` g W_down, ``up dx`` g_h W_up) both ways, interleaved call by call in one process
(:func:`moesaic.bench.measure.time_interleaved`), wall clock, medians, and
checks whether the two give the same bits, including for experts with only a few rows (decoding,
offloaded prefill).

The result (docs/benchmarks.md, issue 13, "An MKL batched GEMM, measured and not adopted"): faster up to
about 256 rows per expert at 2 threads, slower from 512, equal at 1 thread, and *not* bit-identical to
``torch.mm`` for GEMMs of a few rows at 2 threads. That last point would break the bit-identity of offloaded
against resident decoding, so moesaic does not use it; this probe stays to re-check on other hosts.

Usage: ``python benchmarks/mkl_batch_forms.py [--threads N] [--d-model 512] [--d-ff 1024]
[--shapes T:E:k,...] [--repeats 15]``
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
from collections.abc import Callable

import torch

import moesaic  # noqa: F401 - the allocator settings a user's script gets
from moesaic.bench.measure import run_header, time_interleaved
from moesaic.moe.experts.grouped_glu import _mm_rows

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def bind() -> Callable[..., None] | None:
    """``cblas_sgemm_batch`` from libtorch_cpu, or None where this build does not export it."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    except OSError:
        return None
    fn = getattr(lib, "cblas_sgemm_batch", None)
    if fn is not None:
        fn.restype = None
        fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 13 + [ctypes.c_int, ctypes.c_void_p]
    return fn


def batch_rows(fn: Callable[..., None], a: torch.Tensor, w: torch.Tensor, counts: list[int],
               transpose: bool) -> torch.Tensor:
    """Per expert e: ``a[rows_e] @ w[e]^T`` (transpose) or ``a[rows_e] @ w[e]``, one MKL call, one group per
    expert. ``a`` and ``w`` contiguous."""
    E, out_dim = len(counts), (w.shape[1] if transpose else w.shape[2])
    out = a.new_empty(a.shape[0], out_dim)
    m = torch.tensor(counts, dtype=torch.int64)
    start = torch.cumsum(m, 0) - m

    def fill(v: int) -> torch.Tensor:
        return torch.full((E,), v, dtype=torch.int32)

    # every array stays referenced in ``args`` until the call returns: MKL reads the raw pointers
    args = [fill(_NO_TRANS), fill(_TRANS if transpose else _NO_TRANS), m.to(torch.int32), fill(out_dim),
            fill(a.shape[1]), torch.ones(E), a.data_ptr() + start * (a.shape[1] * 4), fill(a.shape[1]),
            w.data_ptr() + torch.arange(E) * (w.stride(0) * 4), fill(w.stride(1)), torch.zeros(E),
            out.data_ptr() + start * (out_dim * 4), fill(out_dim), fill(1)]
    ptrs = [t.data_ptr() for t in args]
    fn(_ROW_MAJOR, *ptrs[:13], E, ptrs[13])
    return out


def loop_rows(a: torch.Tensor, w: torch.Tensor, counts: list[int], transpose: bool) -> torch.Tensor:
    """The fused backend's own CPU loop of ``torch.mm`` into one output (host counts, no grouped_mm)."""
    return _mm_rows(a, w, (counts, None), transpose)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--shapes", default="2048:8:2,2048:32:2,2048:64:8,1024:64:8,8192:8:2")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(run_header("wall", "median ms per form, loop of torch.mm / one MKL batch"))
    fn = bind()
    if fn is None:
        print("this PyTorch build exports no cblas_sgemm_batch: nothing to compare")
        return
    D, Fd = args.d_model, args.d_ff
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        T, E, k = (int(v) for v in shape.split(":"))
        N = T * k
        counts = torch.distributions.Multinomial(N, torch.ones(E)).sample().long().tolist()
        x, h, a, g = torch.randn(N, D), torch.randn(N, 2 * Fd), torch.randn(N, Fd), torch.randn(N, D)
        w_up, w_down = torch.randn(E, 2 * Fd, D), torch.randn(E, D, Fd)
        forms = {"up fwd": (x, w_up, True), "down fwd": (a, w_down, True), "down dx": (g, w_down, False),
                 "up dx": (h, w_up, False)}
        cells, tot_loop, tot_batch, same = [], 0.0, 0.0, True
        for name, (inp, w, tr) in forms.items():
            f_loop = functools.partial(loop_rows, inp, w, counts, tr)
            f_batch = functools.partial(batch_rows, fn, inp, w, counts, tr)
            same &= torch.equal(f_loop(), f_batch())
            t = time_interleaved({"loop": f_loop, "batch": f_batch}, args.repeats)
            lo, ba = 1e3 * t["loop"], 1e3 * t["batch"]
            tot_loop, tot_batch = tot_loop + lo, tot_batch + ba
            cells.append(f"{name} {lo:.1f}/{ba:.1f}")
        print(f"T={T} E={E} k={k} D={D} F={Fd} rows/expert={N // E}: " + "  ".join(cells)
              + f"  | row forms {tot_loop:.0f}/{tot_batch:.0f} ms = {tot_loop / tot_batch:.3f}x, bitwise equal: {same}",
              flush=True)
    # few rows per expert (decode, offloaded prefill), the shapes where the two kernels part
    for rows, inner, outer in ((1, 3072, 256), (1, 256, 6144), (2, 256, 6144), (8, 3072, 256)):
        a, w = torch.randn(4 * rows, inner), torch.randn(4, outer, inner)
        same = torch.equal(loop_rows(a, w, [rows] * 4, True), batch_rows(fn, a, w, [rows] * 4, True))
        print(f"{rows} rows per expert, [{rows}, {inner}] x [{inner}, {outer}]: bitwise equal: {same}")


if __name__ == "__main__":
    main()
