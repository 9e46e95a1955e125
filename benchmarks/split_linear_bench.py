"""F.linear against moesaic.core.split_linear for a few rows (docs/benchmarks.md, "Decode: matrix-vector products
on every core"): the weight shapes of the reference decode models, 96 MB of weights per timed call (so they stream
from memory, as in a decode step), both interleaved in one process, medians; also the memory read rate of
``torch.sum`` over the same bytes.

    python benchmarks/split_linear_bench.py [--threads N] [--rows 1 2 8 32 64] [--repeats 11] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from moesaic.bench.measure import cpu_model
from moesaic.core import split_linear as sl

SHAPES = [(512, 512), (2048, 512), (512, 1024), (4096, 512), (512, 256)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 32, 64])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads {torch.get_num_threads()}, CPU {cpu_model()}, torch {torch.__version__}, wall clock, medians")
    total = 96e6
    big = torch.randn(int(total // 4))
    rows = []
    with torch.inference_mode():
        t_sum = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            big.sum()
            t_sum.append(time.perf_counter() - t0)
        print(f"torch.sum over 96 MB: {total / statistics.median(t_sum) / 1e9:.1f} GB/s")
        for n_out, n_in in SHAPES:
            ws = [torch.randn(n_out, n_in) for _ in range(int(total // (n_out * n_in * 4)))]
            nbytes = len(ws) * n_out * n_in * 4
            for m in a.rows:
                x = torch.randn(m, n_in)
                fs = {"F.linear": lambda x=x, ws=ws: [F.linear(x, w) for w in ws],
                      "split_linear": lambda x=x, ws=ws: [sl.split_linear(x, w) for w in ws]}
                assert all(torch.equal(F.linear(x, w), sl.split_linear(x, w)) for w in ws[:2])
                ts: dict[str, list[float]] = {k: [] for k in fs}
                for f in fs.values():
                    f()
                for _ in range(a.repeats):
                    for k, f in fs.items():
                        t0 = time.perf_counter()
                        f()
                        ts[k].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) for k, v in ts.items()}
                us = {k: 1e6 * v / len(ws) for k, v in med.items()}
                gbs = {k: nbytes / v / 1e9 for k, v in med.items()}
                row = {"shape": [n_out, n_in], "rows": m, "us_per_call": us, "GB_s": gbs,
                       "speedup": med["F.linear"] / med["split_linear"]}
                rows.append(row)
                print(f"[{n_out}, {n_in}] x {m} rows: F.linear {us['F.linear']:7.1f} us ({gbs['F.linear']:4.1f} GB/s), "
                      f"split_linear {us['split_linear']:7.1f} us ({gbs['split_linear']:4.1f} GB/s), "
                      f"{row['speedup']:.2f}x", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "cpu": cpu_model(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
