"""Perplexity, expert memory and evaluation time of weight-only compressed experts (docs/inference.md,
"Compressed experts"): fp32 against int8, int4 (groups of 64 and 32) and the usage plan, on trained
checkpoints' held-out windows (the data the checkpoint names), modes interleaved per repeat.

Usage: ``python benchmarks/quant_experts.py CKPT [CKPT ...] [--threads 1] [--repeats 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import moesaic
from moesaic.core.config import dump_yaml, loads_yaml
from moesaic.inference.quant import QuantConfig, quantize_experts_
from moesaic.inference.quant_plan import expert_usage
from moesaic.train.run_config import load_run_config
from moesaic.train.task import eval_batch_size, evaluate, select_task

MODES = {"fp32": None, "int8": ("int8", 64), "int4 g64": ("int4", 64), "int4 g32": ("int4", 32),
         "plan (hot 50 % int8)": ("plan", 64)}


def one_checkpoint(path: str, repeats: int) -> dict:
    base = moesaic.load(path)
    cfg = load_run_config(data=loads_yaml(dump_yaml(base.run_config)))
    data = cfg.data.build()
    task = select_task(cfg, data)
    batches = data.eval_batches(eval_batch_size(cfg.train))
    loader = data.loader(seed=1234)
    calib = [{"input_ids": loader.next_batch(8)["input_ids"]} for _ in range(4)]
    models, info = {}, {}
    for name, spec in MODES.items():
        m = copy.deepcopy(base).eval()
        if spec is not None:
            usage = expert_usage(m, calib) if spec[0] == "plan" else None
            qcfg = QuantConfig(bits=4 if spec[0] == "int4" else 8, group_size=spec[1], plan=spec[0] == "plan")
            fp = sum(p.numel() * p.element_size() for n, p in m.named_parameters() if ".experts." in n)
            q = quantize_experts_(m, qcfg, usage)
            bits = [b for x in q.values() for b in x.bits_E]
            info[name] = {"ratio": sum(x.nbytes() for x in q.values()) / fp, "int8": bits.count(8),
                          "int4": bits.count(4), "pruned": bits.count(0)}
        models[name] = m
    times: dict[str, list[float]] = {n: [] for n in models}
    loss: dict[str, float] = {}
    for _ in range(repeats):
        for name, m in models.items():
            t = time.perf_counter()
            with torch.no_grad():
                loss[name] = float(evaluate(m, task, batches)["val_loss"])
            times[name].append(time.perf_counter() - t)
    return {n: {"val_loss": loss[n], "ppl": float(torch.tensor(loss[n]).exp()),
                "eval_s": statistics.median(times[n]), **info.get(n, {})} for n in models}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    res = {c: one_checkpoint(c, a.repeats) for c in a.checkpoints}
    for c, rows in res.items():
        print(c)
        for n, r in rows.items():
            rel = r["ppl"] / rows["fp32"]["ppl"] - 1
            print(f"  {n:22s} val_loss {r['val_loss']:.5f}  ppl {r['ppl']:.3f} ({100 * rel:+.3f} %)  "
                  f"expert bytes x{r.get('ratio', 1.0):.3f}  eval {r['eval_s']:.2f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
