"""Training throughput (forward + backward + AdamW step) of the demo MoE LM against its dense twin with the
same active parameters, measured side by side in one process: steps alternate between the two models so
that load from other processes hits both equally; the median step time of each gives tokens/s.

Usage: ``python benchmarks/train_throughput.py [configs/demo.yaml] [--steps 20] [--threads 2]
[--set k=v ...] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import moesaic
from moesaic.examples.demo import count_params, dense_twin
from moesaic.run_config import load_run_config
from moesaic.train.optim import build_adamw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_run_config(args.config, args.overrides)
    vocab = getattr(cfg.data, "vocab_size", 1024)
    if cfg.model.vocab_size is None:
        cfg = load_run_config(args.config, [*args.overrides, f"model.vocab_size={vocab}"])
    B, S = cfg.train.batch_size, cfg.data.seq_len
    runs = {}
    for name, c in (("moe", cfg), ("dense", dense_twin(cfg))):
        torch.manual_seed(0)
        m = c.model.build()
        opt = build_adamw(m, lr=1e-3)  # the trainer's optimizer (fused where supported)
        runs[name] = (m, opt, [])
    g = torch.Generator().manual_seed(0)
    for i in range(args.steps + 2):
        ids = torch.randint(cfg.model.vocab_size, (B, S + 1), generator=g)
        for name in (("moe", "dense") if i % 2 == 0 else ("dense", "moe")):
            m, opt, ts = runs[name]
            t0, c0 = time.perf_counter(), time.process_time()
            out = m(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            moesaic.on_optimizer_step(m, i + 1)
            if i >= 2:  # warm-up steps excluded
                ts.append((time.perf_counter() - t0, time.process_time() - c0))
    res = {"config": args.config, "overrides": args.overrides, "batch": B, "seq_len": S, "threads": args.threads}
    for name, (m, _, ts) in runs.items():
        total, active = count_params(m)
        wall = statistics.median(t for t, _ in ts)
        cpu = statistics.median(c for _, c in ts)
        res[name] = {"tokens_per_s": B * S / wall, "median_step_s": wall, "median_step_cpu_s": cpu,
                     "tokens_per_cpu_s": B * S / cpu, "params": total, "active_params": active}
    res["ratio_moe_over_dense"] = res["moe"]["tokens_per_s"] / res["dense"]["tokens_per_s"]
    res["ratio_moe_over_dense_cpu_time"] = res["moe"]["tokens_per_cpu_s"] / res["dense"]["tokens_per_cpu_s"]
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
