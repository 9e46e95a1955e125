"""The default objective: the task's loss plus the MoE aux losses of one forward."""

from __future__ import annotations

from torch import Tensor, nn

from moesaic.train.objectives.base import OBJECTIVES, LossPieces, Objective, ObjectiveContext
from moesaic.train.task import LMTask


@OBJECTIVES.register("task")
class TaskObjective(Objective):
    """The task loss (token or sequence cross-entropy) plus the aux losses: one forward per micro-batch."""

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], task: LMTask, ctx: ObjectiveContext) -> LossPieces:
        with ctx.autocast():
            logits = task.logits(model, batch)
        ce_sum, _ = task.loss_sum(logits, batch["labels"])
        return LossPieces(ce_sum, ce_sum, ctx.aux(model))
