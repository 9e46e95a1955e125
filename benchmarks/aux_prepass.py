"""Cost of exact aux accumulation (``train.aux_accumulation: exact``): the step time of the demo LM with
gradient accumulation, exact vs ``micro_batch``, measured side by side in one process (steps alternate
between two identical trainers, so load from other processes hits both equally), and the time of the
no-grad pre-pass itself inside the exact steps (moesaic.train.exact_aux.aux_totals).

Usage: ``python benchmarks/aux_prepass.py [configs/demo.yaml] [--grad-accum 4] [--steps 24] [--threads 1]
[--set k=v ...] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from moesaic.train import aux_accumulation
from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="configs/demo.yaml")
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    prepass_s: list[float] = []
    original = aux_accumulation.aux_totals

    def timed(*args, **kw):
        t0 = time.perf_counter()
        out = original(*args, **kw)
        prepass_s.append(time.perf_counter() - t0)
        return out

    aux_accumulation.aux_totals = timed
    trainers = {}
    for mode in ("micro_batch", "exact"):
        cfg = load_run_config(a.config, overrides=[*a.overrides, f"train.aux_accumulation={mode}",
                                                   f"train.grad_accum={a.grad_accum}", f"train.threads={a.threads}",
                                                   "train.progress=false", "train.tensorboard=false"])
        t = Trainer(cfg, tempfile.mkdtemp(prefix="aux_prepass_"), log=lambda m: None)
        t.model.train()
        for _ in range(a.warmup):
            t.train_step(t.loader.next_batch(cfg.train.batch_size))
        trainers[mode] = t
    if not trainers["exact"].aux_acc.prepass:
        raise SystemExit("this config needs no pre-pass (grad_accum 1 or no batch-statistic aux loss)")
    times: dict[str, list[float]] = {m: [] for m in trainers}
    fraction = []
    for i in range(a.steps):
        for mode in ("micro_batch", "exact") if i % 2 == 0 else ("exact", "micro_batch"):
            t = trainers[mode]
            batch = t.loader.next_batch(t.tc.batch_size)
            t0 = time.perf_counter()
            t.train_step(batch)
            dt = time.perf_counter() - t0
            times[mode].append(dt)
            if mode == "exact":
                fraction.append(prepass_s[-1] / (dt - prepass_s[-1]))
    ratios = [e / m for e, m in zip(times["exact"], times["micro_batch"])]
    out = {"config": a.config, "grad_accum": a.grad_accum, "threads": a.threads, "steps": a.steps,
           "micro_batch_ms": statistics.median(times["micro_batch"]) * 1000,
           "exact_ms": statistics.median(times["exact"]) * 1000,
           "overhead_median_pair": statistics.median(ratios) - 1,
           "prepass_over_rest_median": statistics.median(fraction),
           "prepass_over_rest_range": [min(fraction), max(fraction)]}
    print(f"step time: micro_batch {out['micro_batch_ms']:.1f} ms, exact {out['exact_ms']:.1f} ms (medians); "
          f"exact/micro_batch - 1 = {out['overhead_median_pair'] * 100:.1f}% (median of {a.steps} pairs); "
          f"pre-pass / rest of the step = {out['prepass_over_rest_median'] * 100:.1f}% "
          f"(range {min(fraction) * 100:.1f}-{max(fraction) * 100:.1f}%)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
