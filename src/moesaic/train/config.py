"""Training-loop settings (``train:`` section). Names used by outside scripts: ``max_steps``,
``save_every``, ``eval_every``, ``log_every``, ``seed``.

``batch_size`` sequences per optimizer step are split into ``grad_accum`` equal micro-batches; the loss
of a step is defined in :mod:`moesaic.train.loss` so that the split does not change it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from moesaic.core.config import Section, require, rule
from moesaic.train.objectives.base import ObjectiveConfig


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
    grad_accum: int = rule(1, ge=1, doc="micro-batches per optimizer step; must divide batch_size")
    warmup_steps: int = rule(0, ge=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = rule(0.1, ge=0.0, le=1.0, doc="final lr of the cosine schedule / lr")
    beta1: float = rule(0.9, ge=0.0, lt=1.0)
    beta2: float = rule(0.95, ge=0.0, lt=1.0)
    eps: float = rule(1e-8, ge=1e-16, doc="AdamW epsilon; below 1e-16 it no longer keeps an update finite when a "
                      "tiny gradient's square underflows in float32 (found by the config fuzzer: 5e-324 diverged)")
    grad_clip: float = rule(1.0, ge=0.0, doc="max global grad norm; 0 disables clipping")
    dtype: Literal["float32", "float64"] = "float32"
    autocast: Literal["none", "bf16"] = "none"
    eval_batch_size: int | None = rule(None, ge=1)
    eval_at_end: bool = True
    keep_last: int = rule(3, ge=1, doc="checkpoints kept; the newest valid one is never deleted")
    save_at_end: bool = True
    handle_sigterm: bool = True
    progress: bool = True
    tensorboard: bool = True
    threads: int | None = rule(None, ge=1, doc="torch intra-op threads (default: torch's choice)")
    # what a micro-batch contributes to the loss: {kind: task} (default), {kind: thor, alpha: 5.0}, ...
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    on_nonfinite: Literal["stop", "skip_step", "rollback"] = rule(
        "stop", doc="a step with NaN/inf loss or gradients: stop (error naming step and layer), skip_step (no "
        "update), rollback (reload the newest valid checkpoint); see moesaic.train.nonfinite")
    aux_accumulation: Literal["exact", "micro_batch"] = rule(
        "exact", doc="exact: batch-statistic aux losses (Switch balance, CV^2) of the whole step under grad_accum "
        "(a no-grad pre-pass collects the statistics); micro_batch: each micro-batch's own statistics, "
        "token-weighted (cheaper; Megatron-LM/transformers). See moesaic.train.loss")

    def validate(self, path: str) -> None:
        require(self.batch_size % self.grad_accum == 0, f"{path}.grad_accum", self.grad_accum,
                f"must divide batch_size ({self.batch_size})")
