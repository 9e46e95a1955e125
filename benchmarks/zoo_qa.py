"""Extractive QA table of docs/zoo.md: the MiniLM with switch FFNs (upcycled, top-1) vs the dense MiniLM trained
the same way, exact match and F1 on held-out passages of the training plays (in-domain) and on held-out plays
(out-of-domain), over seeds.

    python benchmarks/zoo_qa.py --seeds 0 --json s0.json        # one process per seed (or all seeds in one)
    python benchmarks/zoo_qa.py --combine s0.json s1.json s2.json --markdown table.md

Each run is `configs/zoo/qa_switch_minilm.yaml` (dense twin: ``model.moe=null``), started from the pretrained
MiniLM as ``moesaic train`` starts it (``model.pretrained``), one thread.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from zoo_common import Runs, seed_table, seeds_cli, train_pretrained

from moesaic.train.task import eval_batch_size, evaluate

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "zoo" / "qa_switch_minilm.yaml"
VARIANTS = {"switch MoE (4 experts, top-1, upcycled)": [], "dense MiniLM, same training": ["model.moe=null"]}
METRICS = ("in_domain_em", "in_domain_f1", "ood_em", "ood_f1")


def run_seed(seed: int, steps: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, sets in VARIANTS.items():
        t0 = time.perf_counter()
        t = train_pretrained(RECIPE, sets, seed, steps)
        res: dict[str, float] = {"seconds": time.perf_counter() - t0}
        for split in ("in_domain", "ood"):
            data = t.data
            data.cfg = dataclasses.replace(data.cfg, eval_split=split)
            m = evaluate(t.model, t.task, data.eval_batches(eval_batch_size(t.cfg.train)))
            res.update({f"{split}_em": m["val_em"], f"{split}_f1": m["val_f1"], f"{split}_loss": m["val_loss"]})
        out[name] = res
        print(f"seed {seed} {name}: {res}", file=sys.stderr, flush=True)
    return out


def table(runs: Runs, steps: int) -> str:
    return seed_table(runs, list(VARIANTS), METRICS,
                      "| model | in-domain EM | in-domain F1 | held-out plays EM | held-out plays F1 |",
                      f"{steps} steps of 16 questions, {len(runs)} seeds.")


if __name__ == "__main__":
    seeds_cli(run_seed, table)
