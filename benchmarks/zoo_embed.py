"""Embeddings table of docs/zoo.md: the real MiniLM upcycled into genre experts (domain routing) vs the dense
MiniLM trained the same way vs the untrained MiniLM, same-play recall@k on held-out passages, over seeds.

    python benchmarks/zoo_embed.py --seeds 0 --json s0.json       # one process per seed (or all seeds in one)
    python benchmarks/zoo_embed.py --combine s0.json s1.json s2.json --markdown table.md

Each run is `configs/zoo/embed_minilm.yaml` (dense twin: ``model.moe=null``), started from the pretrained MiniLM
as ``moesaic train`` starts it (``model.pretrained``), one thread.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from zoo_common import Runs, seed_table, seeds_cli, train_pretrained

from moesaic.train.run_config import load_run_config
from moesaic.train.task import eval_batch_size, evaluate, select_task
from moesaic.transforms.upcycle import pretrained_init_state

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "zoo" / "embed_minilm.yaml"
VARIANTS = {"MoE: 3 genre experts (domain routing)": [], "dense MiniLM, same training": ["model.moe=null"]}
UNTRAINED = "dense MiniLM, untrained"
METRICS = ("val_recall@1", "val_recall@5", "val_loss")


def run_seed(seed: int, steps: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, sets in VARIANTS.items():
        t0 = time.perf_counter()
        t = train_pretrained(RECIPE, sets, seed, steps)
        out[name] = {**t.evaluate(), "seconds": time.perf_counter() - t0}
        print(f"seed {seed} {name}: {out[name]}", file=sys.stderr, flush=True)
    cfg = load_run_config(RECIPE, ["model.moe=null"])  # the untrained MiniLM (the same for every seed)
    data = cfg.data.build()
    model = cfg.model.build()
    model.load_state_dict(pretrained_init_state(cfg.model, 0) or {})
    out[UNTRAINED] = evaluate(model, select_task(cfg, data), data.eval_batches(eval_batch_size(cfg.train)))
    return out


def table(runs: Runs, steps: int) -> str:
    return seed_table(runs, [*VARIANTS, UNTRAINED], METRICS,
                      "| model | same-play recall@1 | same-play recall@5 | held-out InfoNCE |",
                      f"{steps} steps of 8 same-play pairs, {len(runs)} seeds.")


if __name__ == "__main__":
    seeds_cli(run_seed, table)
