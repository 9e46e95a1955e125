"""AdvMoE (Zhang et al. 2023, "Robust Mixture-of-Experts Training for Convolutional Neural Networks", ICCV):
adversarial training of an MoE with the routers and the experts updated in alternation.

``train.objective: {kind: advmoe, eps: 0.1, alpha: 0.05, steps: 3, alternate: true}``. Every micro-batch's
input (``input_key``, the pixels of an image classifier) is replaced by an L-inf PGD example
(:func:`moesaic.train.adversarial.pgd_attack`, Madry et al. 2018: ``steps`` sign-gradient steps of size
``alpha`` from a random start, projected onto ``|x' - x|_inf <= eps`` and ``[clip_min, clip_max]``), crafted
against the current model in eval mode; the loss is the task loss on it, plus the routers' aux losses.
``eps_warmup_steps: N`` grows the radius linearly over the first N steps (a curriculum as in Cai et al. 2018,
"Curriculum Adversarial Training", and Gowal et al. 2018's eps ramp): from scratch, a small model trained at
the full radius can stay at a constant prediction.

AdvMoE's bi-level scheme alternates the two parameter groups (``alternate: true``): on even optimizer steps
only the routers learn (every other parameter frozen: the router step on adversarial examples with the experts
fixed); on odd steps everything but the routers learns (the experts, and with them the rest of the network:
attention, embeddings, heads). Each step crafts its own PGD examples against the current parameters. The
paper alternates the two updates within one iteration; here each update is one optimizer step of the trainer
on its own batch, so router and expert updates take turns step by step and one trainer step remains one
AdamW step (checkpoints, resume and the schedule unchanged). A frozen group gets no gradient at all
(``.grad`` stays None), so AdamW, weight decay included, leaves it exactly unchanged
(``tests/train/test_advmoe.py``). ``alternate: false`` is plain joint adversarial training (every parameter
every step; the only choice for a dense model). Single-process training only: under data or expert
parallelism a step that freezes a group would leave DDP's reduction waiting for its gradients.

Robust accuracy: ``moesaic eval RUN`` reports it for a run trained with this objective (PGD with the same
``eps`` and ``eval_steps`` steps, stronger than training), and ``moesaic eval RUN --pgd-eps E`` for any image
classifier. Docs: docs/zoo.md, "AdvMoE".
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from moesaic.core.config import require, rule
from moesaic.core.errors import ConfigError
from moesaic.moe.routing.base import Router
from moesaic.train.adversarial import batch_attack, frozen
from moesaic.train.objectives.base import OBJECTIVES, LossPieces, Objective, ObjectiveConfig, ObjectiveContext
from moesaic.train.task import LMTask


@dataclasses.dataclass
class AdvMoEConfig(ObjectiveConfig):
    eps: float = rule(0.1, ge=0.0, doc="L-inf radius of the PGD ball, in input units (digits pixels: [0, 1])")
    alpha: float = rule(0.0, ge=0.0, doc="PGD step size; 0: 2.5 eps / steps (Madry et al.)")
    steps: int = rule(3, ge=1, doc="PGD steps per training batch")
    alternate: bool = True
    eps_warmup_steps: int = rule(0, ge=0, doc="eps (and alpha) grow linearly from eps / N to eps over N steps")
    eval_steps: int = rule(20, ge=1, doc="PGD steps of the robust accuracy that moesaic eval reports")
    random_start: bool = True
    input_key: str = "pixel_values"
    clip_min: float = 0.0
    clip_max: float = 1.0

    def validate(self, path: str) -> None:
        super().validate(path)
        require(self.clip_min < self.clip_max, f"{path}.clip_max", self.clip_max,
                f"must be above clip_min ({self.clip_min})")

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha > 0 else 2.5 * self.eps / self.steps

    def ramp(self, step: int) -> float:
        """The share of ``eps`` (and ``alpha``) used at optimizer step ``step`` (0-based)."""
        return 1.0 if self.eps_warmup_steps == 0 else min(1.0, (step + 1) / self.eps_warmup_steps)


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every MoE router of ``model`` (each once)."""
    seen: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, Router):
            for p in m.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


@OBJECTIVES.register("advmoe")
class AdvMoEObjective(Objective):
    """Adversarial training under PGD; routers and experts (+ the rest) updated in alternation (AdvMoE)."""

    Config = AdvMoEConfig
    cfg: AdvMoEConfig
    tasks = ("classification",)

    def setup(self, model: nn.Module, task: LMTask) -> None:
        super().setup(model, task)
        self.routers = router_parameters(model)
        ids = {id(p) for p in self.routers}
        self.others = [p for p in model.parameters() if id(p) not in ids]
        if self.cfg.alternate and not self.routers:
            raise ConfigError("train.objective.alternate", True, "alternates router and expert updates and needs a "
                              "model with trainable MoE routers; use alternate: false for a dense model")

    def phase(self, step: int) -> str:
        """``router`` (even steps), ``experts`` (odd steps), or ``joint`` without alternation."""
        if not self.cfg.alternate:
            return "joint"
        return "router" if step % 2 == 0 else "experts"

    def frozen_parameters(self, step: int) -> list[nn.Parameter]:
        """What does not learn at optimizer step ``step``."""
        return {"router": self.others, "experts": self.routers, "joint": []}[self.phase(step)]

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], task: LMTask, ctx: ObjectiveContext) -> LossPieces:
        cfg = self.cfg
        if cfg.input_key not in batch:
            raise ConfigError("train.objective.input_key", cfg.input_key,
                              f"is not an input of the batch (inputs: {', '.join(sorted(batch))})")
        r = cfg.ramp(ctx.step)
        adv = batch_attack(model, task, batch, cfg.input_key, r * cfg.eps, r * cfg.step_size, cfg.steps, cfg.clip_min,
                           cfg.clip_max, cfg.random_start)
        with frozen(self.frozen_parameters(ctx.step)), ctx.autocast():
            logits = task.logits(model, adv)
            aux = ctx.aux(model)
        ce_sum, _ = task.loss_sum(logits, batch["labels"])
        return LossPieces(ce_sum, ce_sum, aux)
