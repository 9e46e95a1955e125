"""The training objective hook: what one micro-batch contributes to the step's loss.

The trainer calls ``objective(model, batch, task, ctx)`` once per micro-batch (and once more per
micro-batch in the no-grad pre-pass of exact aux accumulation, which must see the same forwards). The
objective runs the model as many times as it needs, calls ``ctx.aux(model)`` right after each forward
(the aux losses of that forward as the trainer wants them: plain, or their exact share of the step;
:mod:`moesaic.train.exact_aux`), and returns :class:`LossPieces`. The trainer adds
``loss_sum / N + w * aux`` (``N`` valid targets of the whole step, ``w`` the micro-batch's token share or 1
for exact shares) and calls ``backward``; the step loss therefore stays exact under gradient
accumulation and data parallelism (docs/training.md, "Loss under accumulation and padding").

An objective may hold modules of its own that are not parameters of the trained model, such as a frozen
teacher for distillation: :meth:`Objective.setup` receives the model once, after it is built and before
the optimizer is, so the objective can build the teacher on the model's device and dtype; the optimizer,
the checkpoints and the gradient all-reduce only ever see the model's parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from moesaic.core.config import ComponentConfig
from moesaic.core.errors import ConfigError
from moesaic.core.registry import Registry

if TYPE_CHECKING:
    from moesaic.train.task import LMTask


#: Training objectives (``train.objective: {kind: NAME}``): the default task loss, THOR, ... (docs/training.md).
OBJECTIVES: Registry[type[Objective]] = Registry(
    "objective", "moesaic.train.objectives", base="moesaic.train.objectives.base:Objective", default="task")


@dataclasses.dataclass
class ObjectiveConfig(ComponentConfig):
    """``train.objective``: ``kind`` names a registered objective; subclasses add its settings."""

    registry = OBJECTIVES


@dataclasses.dataclass
class LossPieces:
    """One micro-batch's contribution. ``loss_sum``: the objective summed over the micro-batch's valid
    targets (the trainer divides by the step's count); ``task_loss_sum``: the task loss on the same scale,
    logged as ``loss``; ``aux``: the sum of ``ctx.aux(model)`` over the objective's forwards."""

    loss_sum: Tensor
    task_loss_sum: Tensor
    aux: Tensor


@dataclasses.dataclass
class ObjectiveContext:
    """What the trainer lends an objective for one micro-batch: ``aux(model)`` after each forward, the
    autocast context of ``train.autocast`` to run forwards under, and the number of optimizer steps taken
    before this one (``step``; restored on resume), for objectives that alternate between steps (AdvMoE)."""

    aux: Callable[[nn.Module], Tensor]
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    step: int = 0


class Objective:
    """Base class. Subclasses register with ``@OBJECTIVES.register(name)``, set ``Config`` and implement
    :meth:`__call__`."""

    Config: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    #: Task kinds (``LMTask.kind``) the objective is defined for; None: every task.
    tasks: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    def setup(self, model: nn.Module, task: LMTask) -> None:
        """Called once with the built model (before the optimizer): check the task, build frozen helpers."""
        if self.tasks is not None and task.kind not in self.tasks:
            raise ConfigError("train.objective.kind", self.cfg.kind, f"is defined for {' and '.join(self.tasks)} "
                              f"tasks only, not for the {task.kind} task of this model")

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], task: LMTask, ctx: ObjectiveContext) -> LossPieces:
        raise NotImplementedError
