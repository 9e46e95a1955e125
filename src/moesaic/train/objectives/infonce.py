"""In-batch contrastive training of sentence embeddings (``train.objective: {kind: infonce, temperature: 0.05}``).

InfoNCE (van den Oord et al. 2018) with in-batch negatives, as SimCSE (Gao et al. 2021) and Sentence-BERT's
multiple-negatives ranking loss use it, and as Hallee et al. 2024 train their domain-expert (MoE) embedding
models: rows ``2i``/``2i + 1`` of a batch are a positive pair (``shakespeare_passages``: two passages of one
play), every other row a negative. The loss and its false-negative rule are :func:`moesaic.train.retrieval.
info_nce_sum`; this objective chooses the temperature (the logged ``loss`` stays at the task's). Micro-batches
must keep pairs together (an even micro-batch size), since the negatives are the micro-batch's rows.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from moesaic.core.config import rule
from moesaic.train.objectives.base import OBJECTIVES, LossPieces, Objective, ObjectiveConfig, ObjectiveContext
from moesaic.train.retrieval import info_nce_sum
from moesaic.train.task import LMTask


@dataclasses.dataclass
class InfoNCEConfig(ObjectiveConfig):
    temperature: float = rule(0.05, gt=0.0)


@OBJECTIVES.register("infonce")
class InfoNCEObjective(Objective):
    """In-batch InfoNCE over same-play pairs (SimCSE / Sentence-BERT; Hallee et al. 2024) plus the aux losses."""

    Config = InfoNCEConfig
    cfg: InfoNCEConfig
    tasks = ("embedding",)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], task: LMTask, ctx: ObjectiveContext) -> LossPieces:
        with ctx.autocast():
            e_BD = task.logits(model, batch)
        loss, _ = info_nce_sum(e_BD, batch["labels"], self.cfg.temperature)
        if getattr(task, "temperature", None) != self.cfg.temperature:
            task_loss = task.loss_sum(e_BD.detach(), batch["labels"])[0]  # logged at the task's temperature
        else:
            task_loss = loss.detach()
        return LossPieces(loss, task_loss, ctx.aux(model))
