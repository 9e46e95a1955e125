"""Extractive QA table of docs/zoo.md: the MiniLM with switch FFNs (upcycled, top-1) vs the dense MiniLM trained
the same way, exact match and F1 on held-out passages of the training plays (in-domain) and on held-out plays
(out-of-domain), over seeds.

    python benchmarks/zoo_qa.py --seeds 0 --json s0.json        # one process per seed (or all seeds in one)
    python benchmarks/zoo_qa.py --combine s0.json s1.json s2.json --markdown table.md

Each run is `configs/zoo/qa_switch_minilm.yaml` (dense twin: ``model.moe=null``), started from the pretrained
MiniLM as ``moesaic train`` starts it (``model.pretrained``), one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from moesaic.train.run_config import load_run_config
from moesaic.train.task import eval_batch_size, evaluate
from moesaic.train.trainer import Trainer
from moesaic.transforms.upcycle import pretrained_init_state

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "zoo" / "qa_switch_minilm.yaml"
VARIANTS = {"switch MoE (4 experts, top-1, upcycled)": [], "dense MiniLM, same training": ["model.moe=null"]}
METRICS = ("in_domain_em", "in_domain_f1", "ood_em", "ood_f1")


def run_seed(seed: int, steps: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, sets in VARIANTS.items():
        cfg = load_run_config(RECIPE, [*sets, f"train.seed={seed}", f"train.max_steps={steps}", "train.threads=1",
                                       f"train.eval_every={steps}", "train.save_at_end=false", "train.progress=false",
                                       "train.save_every=100000"])
        t0 = time.perf_counter()
        t = Trainer(cfg, tempfile.mkdtemp(prefix="zoo-qa-"), log=lambda _m: None,
                    init_state=pretrained_init_state(cfg.model, seed), init_from="model.pretrained")
        assert t.run() == 0
        res: dict[str, float] = {"seconds": time.perf_counter() - t0}
        for split in ("in_domain", "ood"):
            data = t.data
            data.cfg = dataclasses.replace(data.cfg, eval_split=split)
            m = evaluate(t.model, t.task, data.eval_batches(eval_batch_size(cfg.train)))
            res.update({f"{split}_em": m["val_em"], f"{split}_f1": m["val_f1"], f"{split}_loss": m["val_loss"]})
        out[name] = res
        print(f"seed {seed} {name}: {res}", file=sys.stderr, flush=True)
    return out


def table(runs: list[dict[str, dict[str, float]]], steps: int) -> str:
    lines = ["| model | in-domain EM | in-domain F1 | held-out plays EM | held-out plays F1 |", "|---|---|---|---|---|"]
    for name in VARIANTS:
        cells = []
        for m in METRICS:
            vals = [r[name][m] for r in runs]
            cells.append(f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}" if len(vals) > 1
                         else f"{vals[0]:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{steps} steps of 16 questions, {len(runs)} seeds.\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json", default=None)
    p.add_argument("--combine", nargs="+", default=None)
    p.add_argument("--markdown", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.combine:
        runs = [r for f in a.combine for r in json.loads(Path(f).read_text())["runs"]]
        steps = json.loads(Path(a.combine[0]).read_text())["steps"]
    else:
        runs = [run_seed(s, a.steps) for s in a.seeds]
        steps = a.steps
        if a.json:
            Path(a.json).write_text(json.dumps({"steps": steps, "seeds": a.seeds, "runs": runs}, indent=1))
    md = table(runs, steps)
    print(md)
    if a.markdown:
        Path(a.markdown).write_text(md)


if __name__ == "__main__":
    main()
