"""What the zoo benchmarks share: one short training run of a recipe, quietly, one thread, no checkpoints."""

from __future__ import annotations

import tempfile
from pathlib import Path

from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer


def train(recipe: Path, sets: list[str], seed: int, steps: int) -> Trainer:
    """Train ``recipe`` with ``--set`` overrides ``sets`` for ``steps`` steps (seed ``seed``); the trainer."""
    cfg = load_run_config(recipe, [*sets, f"train.seed={seed}", f"train.max_steps={steps}", "train.threads=1",
                                   f"train.eval_every={steps}", "train.save_at_end=false", "train.progress=false",
                                   "train.save_every=100000"])
    t = Trainer(cfg, tempfile.mkdtemp(prefix=f"zoo-{recipe.stem}-"), log=lambda _m: None)
    assert t.run() == 0
    return t
