"""What the zoo benchmarks share: one short training run of a recipe, quietly, one thread, no checkpoints;
a run started from the recipe's pretrained model; the mean ± sd table over seeds and the per-seed CLI."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer

Runs = list[dict[str, dict[str, float]]]  # per seed: {variant: {metric: value}}


def _overrides(sets: list[str], seed: int, steps: int) -> list[str]:
    return [*sets, f"train.seed={seed}", f"train.max_steps={steps}", "train.threads=1", f"train.eval_every={steps}",
            "train.save_at_end=false", "train.progress=false", "train.save_every=100000"]


def train(recipe: Path, sets: list[str], seed: int, steps: int) -> Trainer:
    """Train ``recipe`` with ``--set`` overrides ``sets`` for ``steps`` steps (seed ``seed``); the trainer."""
    cfg = load_run_config(recipe, _overrides(sets, seed, steps))
    t = Trainer(cfg, tempfile.mkdtemp(prefix=f"zoo-{recipe.stem}-"), log=lambda _m: None)
    assert t.run() == 0
    return t


def train_pretrained(recipe: Path, sets: list[str], seed: int, steps: int) -> Trainer:
    """As :func:`train`, started from the recipe's ``model.pretrained`` weights as ``moesaic train`` starts it."""
    from moesaic.transforms.upcycle import pretrained_init_state

    cfg = load_run_config(recipe, _overrides(sets, seed, steps))
    t = Trainer(cfg, tempfile.mkdtemp(prefix=f"zoo-{recipe.stem}-"), log=lambda _m: None,
                init_state=pretrained_init_state(cfg.model, seed), init_from="model.pretrained")
    assert t.run() == 0
    return t


def seed_table(runs: Runs, names: Sequence[str], metrics: Sequence[str], header: str, footer: str) -> str:
    """A markdown table: one row per variant in ``names``, ``mean ± sd`` over the seeds per metric."""
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    for name in names:
        cells = []
        for m in metrics:
            vals = [r[name][m] for r in runs]
            cells.append(f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}" if len(vals) > 1
                         else f"{vals[0]:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{footer}\n"


def seeds_cli(run_seed: Callable[[int, int], dict[str, dict[str, float]]],
              table: Callable[[Runs, int], str]) -> None:
    """``--seeds S... --steps N [--json F]`` runs and tabulates; ``--combine F... [--markdown M]`` joins runs
    written by separate processes (one per seed)."""
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
