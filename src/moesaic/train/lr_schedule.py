"""Learning-rate schedule: linear warm-up then cosine decay to ``min_lr_ratio * lr`` (Loshchilov & Hutter
2017), or constant after warm-up. A pure function of the step, so resuming needs only the step."""

from __future__ import annotations

import math

from moesaic.train.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` for the optimizer step with 0-based index ``step``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
