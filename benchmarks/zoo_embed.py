"""Embeddings table of docs/zoo.md: the real MiniLM upcycled into genre experts (domain routing) vs the dense
MiniLM trained the same way vs the untrained MiniLM, same-play recall@k on held-out passages, over seeds.

    python benchmarks/zoo_embed.py --seeds 0 --json s0.json       # one process per seed (or all seeds in one)
    python benchmarks/zoo_embed.py --combine s0.json s1.json s2.json --markdown table.md

Each run is `configs/zoo/embed_minilm.yaml` (dense twin: ``model.moe=null``), started from the pretrained MiniLM
as ``moesaic train`` starts it (``model.pretrained``), one thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from moesaic.train.run_config import load_run_config
from moesaic.train.task import eval_batch_size, evaluate, select_task
from moesaic.train.trainer import Trainer
from moesaic.transforms.upcycle import pretrained_init_state

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "zoo" / "embed_minilm.yaml"
VARIANTS = {"MoE: 3 genre experts (domain routing)": [], "dense MiniLM, same training": ["model.moe=null"]}
UNTRAINED = "dense MiniLM, untrained"
METRICS = ("val_recall@1", "val_recall@5", "val_loss")


def run_seed(seed: int, steps: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, sets in VARIANTS.items():
        cfg = load_run_config(RECIPE, [*sets, f"train.seed={seed}", f"train.max_steps={steps}", "train.threads=1",
                                       f"train.eval_every={steps}", "train.save_at_end=false", "train.progress=false",
                                       "train.save_every=100000"])
        t0 = time.perf_counter()
        t = Trainer(cfg, tempfile.mkdtemp(prefix="zoo-embed-"), log=lambda _m: None,
                    init_state=pretrained_init_state(cfg.model, seed), init_from="model.pretrained")
        assert t.run() == 0
        out[name] = {**t.evaluate(), "seconds": time.perf_counter() - t0}
        print(f"seed {seed} {name}: {out[name]}", file=sys.stderr, flush=True)
    cfg = load_run_config(RECIPE, ["model.moe=null"])  # the untrained MiniLM (the same for every seed)
    data = cfg.data.build()
    model = cfg.model.build()
    model.load_state_dict(pretrained_init_state(cfg.model, 0) or {})
    out[UNTRAINED] = evaluate(model, select_task(cfg, data), data.eval_batches(eval_batch_size(cfg.train)))
    return out


def table(runs: list[dict[str, dict[str, float]]], steps: int) -> str:
    lines = ["| model | same-play recall@1 | same-play recall@5 | held-out InfoNCE |", "|---|---|---|---|"]
    for name in [*VARIANTS, UNTRAINED]:
        cells = []
        for m in METRICS:
            vals = [r[name][m] for r in runs]
            cells.append(f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}" if len(vals) > 1
                         else f"{vals[0]:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{steps} steps of 8 same-play pairs, {len(runs)} seeds.\n"


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
