"""Training-loop settings (``train:`` section). Names used by outside scripts: ``max_steps``,
``save_every``, ``eval_every``, ``log_every``, ``seed``."""

from __future__ import annotations

import dataclasses

from moesaic.config import Section, rule


@dataclasses.dataclass
class TrainConfig(Section):
    max_steps: int = rule(100, ge=1)
    batch_size: int = rule(16, ge=1)
    lr: float = rule(1e-3, gt=0.0)
    weight_decay: float = rule(0.0, ge=0.0)
    seed: int = 0
    log_every: int = rule(10, ge=1)
    eval_every: int = rule(100, ge=1)
    save_every: int = rule(100, ge=1)
