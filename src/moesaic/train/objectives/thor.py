"""THOR (Zuo et al. 2022, "Taming Sparsely Activated Transformer with Stochastic Experts"): two stochastic
forward passes per micro-batch and a consistency regulariser, as a training objective.

``L = CE(pass 1) + CE(pass 2) + alpha * CR`` with ``CR`` from
:func:`moesaic.moe.routing.thor.thor_consistency_loss`. Select it with
``train.objective: {kind: thor, alpha: 5.0}`` together with ``router: {kind: thor}`` (configs/papers/thor_lm.yaml);
the paper's IWSLT'14 script uses ``alpha = 5`` and label smoothing 0.1. :func:`thor_step` is the same step
for loops of your own (examples/paper_toys.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from moesaic.core.config import rule
from moesaic.moe.api import collect_aux_losses
from moesaic.moe.routing.thor import thor_consistency_loss
from moesaic.train.loss import IGNORE_INDEX, lm_loss_sum
from moesaic.train.objectives.base import OBJECTIVES, LossPieces, Objective, ObjectiveConfig, ObjectiveContext
from moesaic.train.task import LMTask

#: ``loss_fn(model, batch) -> (ce, logits, mask)``: one forward pass; ``mask`` may be None.
PassFn = Callable[[nn.Module, Any], tuple[Tensor, Tensor, Tensor | None]]


@dataclasses.dataclass
class ThorStepOutput:
    loss: Tensor  # ce1 + ce2 + alpha * cr + aux of both passes: call backward() on this
    ce1: Tensor
    ce2: Tensor
    cr: Tensor
    aux: Tensor  # the routers' weighted aux losses of both passes (0 for pure THOR layers)


def thor_step(model: nn.Module, batch: Any, loss_fn: PassFn, alpha: float = 1.0,
              aux: Callable[[nn.Module], Tensor] = collect_aux_losses) -> ThorStepOutput:
    """Run two stochastic forward passes of ``model`` on ``batch`` and combine them.

    Each pass draws its own experts (THOR routers use torch's global generator), so the two passes
    differ; with one expert and dropout off they are identical and ``loss = 2 * CE``. ``aux(model)`` is
    called right after each pass (each forward replaces a layer's aux losses).
    """
    ce1, logits1, mask1 = loss_fn(model, batch)
    aux1 = aux(model)
    ce2, logits2, _ = loss_fn(model, batch)
    aux2 = aux(model)
    cr = thor_consistency_loss(logits1, logits2, mask1)
    total_aux = aux1 + aux2
    return ThorStepOutput(loss=ce1 + ce2 + alpha * cr.to(ce1.dtype) + total_aux, ce1=ce1, ce2=ce2, cr=cr,
                          aux=total_aux)


def thor_lm_step(model: nn.Module, batch: dict[str, Tensor], alpha: float,
                 autocast: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
                 aux: Callable[[nn.Module], Tensor] = collect_aux_losses) -> ThorStepOutput:
    """:func:`thor_step` for a language model batch (``input_ids``, ``labels``, optional
    ``attention_mask``): summed token cross-entropies and the consistency over positions with a label."""
    ctx = autocast or contextlib.nullcontext

    def lm_pass(m: nn.Module, b: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        with ctx():
            logits = m(b["input_ids"], attention_mask=b.get("attention_mask")).logits
        ce_sum, _ = lm_loss_sum(logits, b["labels"])
        return ce_sum, logits, b["labels"] != IGNORE_INDEX

    return thor_step(model, batch, lm_pass, alpha, aux)


@dataclasses.dataclass
class ThorObjectiveConfig(ObjectiveConfig):
    alpha: float = rule(1.0, ge=0.0, doc="weight of the consistency regulariser (the paper's script: 5)")


@OBJECTIVES.register("thor")
class ThorObjective(Objective):
    """THOR: two stochastic passes, CE1 + CE2 + alpha * consistency (Zuo et al. 2022)."""

    Config = ThorObjectiveConfig
    tasks = ("lm",)
    cfg: ThorObjectiveConfig

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], task: LMTask, ctx: ObjectiveContext) -> LossPieces:
        alpha = self.cfg.alpha
        th = thor_lm_step(model, batch, alpha, ctx.autocast, ctx.aux)
        return LossPieces(th.ce1 + th.ce2 + alpha * th.cr, (th.ce1 + th.ce2) / 2, th.aux)
