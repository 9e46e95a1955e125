"""ViT-MoE multi-task on digits (configs/zoo/vit_moe_digits.yaml) against shared top-k routing and the dense
twin (equal active parameters), 3 seeds, per-task validation accuracy; and task-pruned inference (M3ViT):
expert parameters kept and forward time, interleaved with the full model in one process.

Usage: ``python benchmarks/zoo_vit_digits.py [--steps 600] [--seeds 0,1,2] [--markdown OUT.md]``. Each
training run uses one thread (runs are small; the table is about quality, not speed).
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
from pathlib import Path

import torch
from zoo_common import train

from moesaic.bench.measure import time_interleaved
from moesaic.train.task import evaluate
from moesaic.train.trainer import Trainer
from moesaic.transforms.task_prune import prune_model_to_task

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "zoo" / "vit_moe_digits.yaml"
VARIANTS = {"task routing (task_gates, window 4)": [],
            "shared top-k routing": ["model.moe.router={kind: topk}"],
            "dense twin": ["model.moe=null"]}



def per_task(t: Trainer) -> list[float]:
    return [evaluate(t.model, t.task, t.data.eval_batches(256, task=k))["val_accuracy"]
            for k in range(len(t.data.cfg.tasks))]


def pruned_speed(t: Trainer, repeats: int = 30) -> list[str]:
    model = t.model.eval()
    x = t.data.val_x[:256]
    rows = []
    full = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    for k, name in enumerate(t.data.cfg.tasks):
        pruned = prune_model_to_task(model, k).eval()
        kept = sum(p.numel() for n, p in pruned.named_parameters() if ".experts." in n)
        with torch.no_grad():
            same = torch.equal(pruned(x, task_id=k).logits, model(x, task_id=k).logits)
            s = time_interleaved({"full": partial(model, x, task_id=k), "pruned": partial(pruned, x, task_id=k)},
                                 repeats=repeats, warmup=2)
        rows.append(f"| {name} | {kept / full:.2f} | {s['full'] * 1e3:.2f} | {s['pruned'] * 1e3:.2f} | "
                    f"{s['full'] / s['pruned']:.2f}x | {same} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--markdown", default="")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    acc: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    last: Trainer | None = None
    for seed in seeds:
        for v, sets in VARIANTS.items():
            t = train(RECIPE, sets, seed, args.steps)
            acc[v].append(per_task(t))
            print(v, seed, acc[v][-1], flush=True)
            if v.startswith("task routing"):
                last = t
    tasks = ["digit", "parity", ">= 5"]
    lines = ["| model | " + " | ".join(f"{n} accuracy" for n in tasks) + " | mean |", "|---|" + "---|" * 4]
    for v, runs in acc.items():
        cells = []
        for k in range(3):
            xs = [r[k] for r in runs]
            cells.append(f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.4f}")
        means = [statistics.mean(r) for r in runs]
        cells.append(f"{statistics.mean(means):.4f} ± {statistics.stdev(means) if len(means) > 1 else 0:.4f}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    assert last is not None
    lines += ["", f"Task-pruned inference (task-routing model, seed {seeds[-1]}; 256 validation images, one thread, "
              "median of 30 interleaved forwards):", "",
              "| task | expert parameters kept | full ms | pruned ms | speed-up | outputs bitwise equal |",
              "|---|---|---|---|---|---|", *pruned_speed(last)]
    md = "\n".join(lines) + f"\n\n{args.steps} steps, seeds {seeds}.\n"
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md)


if __name__ == "__main__":
    main()
