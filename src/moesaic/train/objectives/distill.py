"""Knowledge distillation into the trained model (typically an MoE student from a dense teacher).

``train.objective: {kind: distill, teacher: CKPT_OR_HF, alpha: 0.5, temperature: 2.0, hidden_loss: none}``.
Per labelled position the loss is

    (1 - alpha) * CE(student, label) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
    + hidden_weight * d(h_s, h_t)

summed over the micro-batch's labelled positions (Hinton et al. 2015, "Distilling the Knowledge in a Neural
Network"; the T^2 factor keeps gradient scales comparable across temperatures). ``hidden_loss`` (``mse``
or ``cosine`` = 1 - cos) matches the final hidden states when the widths agree, the representation loss
of MoE distillation papers: m2mKD (Lo et al. 2024, "m2mKD: Module-to-Module Knowledge Distillation for
Modular Transformers"), TransKD and Mixture-of-Students (Salinas et al. 2022, "Knowledge Distillation for
Mixture of Experts Models in Speech Recognition"). The teacher runs in eval mode under ``torch.no_grad``;
it is held by the objective, never by the optimizer or the checkpoints. The logged ``loss`` stays the
student's task loss. Docs: docs/convert.md, "distill".

**Several teachers** (``teachers: [CKPT, ...]`` instead of ``teacher``), the setting of Meta-DMoE (Zhong et al.
2022, "Meta-DMoE: Adapting to Domain Shift by Meta-Distillation from Mixture-of-Experts"): one teacher per
training domain, the student learns from their aggregate, a mixture ``q = sum_d w_d softmax(z_d / T)`` that
replaces the single teacher's distribution in the KL above. ``aggregation`` picks the weights:

* ``mean``: ``w_d = 1 / D``, the average of the teachers' distributions;
* ``posterior`` (language models): the Bayesian gate of a mixture of domain models, ``w_d`` at position ``t`` the
  posterior of domain ``d`` given the window's earlier tokens, ``softmax_d(sum_{s < t} log p_d(x_{s+1} | x_{<=s}))``
  (uniform at the first position), so ``q`` at ``T = 1`` is the mixture's exact predictive distribution.

Meta-DMoE learns its aggregator (a transformer over the teachers' features) by meta-learning and adapts the
student at test time; both aggregations here have no parameters and there is no test-time adaptation
(docs/zoo.md, "Meta-DMoE"). ``hidden_loss`` needs a single teacher.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.core.config import ConfigError, require, rule
from moesaic.core.errors import CheckpointError
from moesaic.train.loss import IGNORE_INDEX
from moesaic.train.objectives.base import OBJECTIVES, LossPieces, Objective, ObjectiveConfig, ObjectiveContext
from moesaic.train.task import LMTask

#: Loaders tried in order for a teacher path that is not a moesaic checkpoint: ``fn(path) -> model or None``.
#: ``moesaic.interop.load`` adds the Hugging Face folder loader (this layer cannot import interop).
TEACHER_LOADERS: list[Callable[[Path], nn.Module | None]] = []


class MissingTeacherError(ConfigError):
    """``train.objective.teacher`` is empty, or names nothing that loads."""


@dataclasses.dataclass
class DistillConfig(ObjectiveConfig):
    teacher: str = ""
    teachers: list[str] = dataclasses.field(default_factory=list)
    aggregation: Literal["mean", "posterior"] = "mean"
    alpha: float = rule(0.5, ge=0.0, le=1.0)
    temperature: float = rule(2.0, gt=0.0)
    hidden_loss: Literal["none", "mse", "cosine"] = "none"
    hidden_weight: float = rule(1.0, ge=0.0)

    def validate(self, path: str) -> None:
        super().validate(path)
        require(not (self.teacher and self.teachers), f"{path}.teachers", self.teachers,
                "give either teacher (one) or teachers (several), not both")
        require(not (self.teachers and self.hidden_loss != "none"), f"{path}.hidden_loss", self.hidden_loss,
                "matches one teacher's hidden states; with several teachers use hidden_loss: none")


def _wide(x: Tensor) -> Tensor:
    """fp32 for half-precision tensors (losses in fp32 or better), others unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def load_teacher(path: str, field: str = "train.objective.teacher") -> nn.Module:
    """The teacher model (eval mode, frozen): a moesaic checkpoint, or anything a registered loader opens."""
    if not path:
        raise MissingTeacherError(field, path, "distillation needs a teacher "
                                  "(a moesaic checkpoint or a Hugging Face folder)")
    p = Path(path)
    if not p.exists():
        raise MissingTeacherError(field, path, "not found")
    model: nn.Module | None = None
    for loader in TEACHER_LOADERS:
        model = loader(p)
        if model is not None:
            break
    if model is None:
        from moesaic.train.checkpoint import load_model

        try:
            model = load_model(p)
        except CheckpointError as e:
            raise MissingTeacherError(field, path, f"does not load: {e}") from None
    return model.eval().requires_grad_(False)


def teacher_log_mixture(logits: list[Tensor], labels: Tensor, temperature: float, aggregation: str) -> Tensor:
    """``log q`` of the teachers' mixture ``q = sum_d w_d softmax(z_d / T)`` (shape of one teacher's logits);
    one teacher: its ``log_softmax(z / T)``. ``posterior`` weights (``[B, S, V]`` logits, ``labels`` the next
    tokens, ``-100`` ignored): ``w_d`` at position t is ``softmax_d`` of teacher d's summed log-likelihood of the
    labels before t (a uniform prior)."""
    logp_D = torch.stack([(z / temperature).log_softmax(-1) for z in logits])  # [D, ..., V]
    D = logp_D.shape[0]
    if D == 1:
        return logp_D[0]
    if aggregation == "posterior":
        ll = torch.stack([z.log_softmax(-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
                          for z in logits]) * (labels != IGNORE_INDEX)  # [D, B, S]
        prefix = ll.cumsum(-1) - ll  # log-likelihood of the labels strictly before each position
        logw = prefix.log_softmax(0).unsqueeze(-1)
    else:
        logw = torch.full((D,) + (1,) * (logp_D.dim() - 1), -math.log(D), dtype=logp_D.dtype, device=logp_D.device)
    return (logw + logp_D).logsumexp(0)


@OBJECTIVES.register("distill")
class DistillObjective(Objective):
    """Task CE mixed with temperature-scaled KL to a frozen teacher, plus an optional hidden-state loss."""

    Config = DistillConfig
    cfg: DistillConfig
    tasks = ("lm", "classification")

    def setup(self, model: nn.Module, task: LMTask) -> None:
        super().setup(model, task)
        p = next(model.parameters())
        if self.cfg.teachers:
            self.teachers = [load_teacher(t, f"train.objective.teachers.{i}").to(device=p.device, dtype=p.dtype)
                             for i, t in enumerate(self.cfg.teachers)]
            if self.cfg.aggregation == "posterior" and task.kind != "lm":
                raise ConfigError("train.objective.aggregation", "posterior", "weighs teachers by their likelihood "
                                  f"of the window's earlier tokens: language models only, not the {task.kind} task")
            self.teacher = self.teachers[0]
            return
        teacher = load_teacher(self.cfg.teacher).to(device=p.device, dtype=p.dtype)
        if self.cfg.hidden_loss != "none":
            dt, ds = getattr(getattr(teacher, "cfg", None), "d_model", None), getattr(getattr(model, "cfg", None),
                                                                                      "d_model", None)
            if dt is None or dt != ds:
                raise ConfigError("train.objective.hidden_loss", self.cfg.hidden_loss,
                                  f"needs teacher and student of one width (teacher d_model {dt}, student {ds})")
        self.teacher = teacher
        self.teachers = [teacher]

    def _run(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        hidden = self.cfg.hidden_loss != "none"
        out: Any = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                         **({"output_hidden_states": True} if hidden else {}))
        return out.logits, (out.hidden_states if hidden else None)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], task: LMTask, ctx: ObjectiveContext) -> LossPieces:
        cfg = self.cfg
        with ctx.autocast():
            logits, h_s = self._run(model, batch)
        aux = ctx.aux(model)
        with torch.no_grad():
            outs = [self._run(t, batch) for t in self.teachers]
            if any(o[0].shape != logits.shape for o in outs):
                raise ConfigError("train.objective.teachers", cfg.teachers or cfg.teacher, "teacher logits "
                                  f"{[tuple(o[0].shape) for o in outs]} do not match the student's "
                                  f"{tuple(logits.shape)} (teachers and student need one vocabulary / label set)")
            h_t = outs[0][1]
        ce_sum, _ = task.loss_sum(logits, batch["labels"])
        labels = batch["labels"]
        keep = labels != IGNORE_INDEX
        if logits.dim() == 2:  # sequence classification: one row per sequence
            keep = keep.reshape(-1)
        with torch.no_grad():
            logq = teacher_log_mixture([_wide(o[0]).to(logits.dtype) for o in outs], labels, cfg.temperature,
                                       cfg.aggregation)[keep]
        s = _wide(logits[keep]) / cfg.temperature
        kl = F.kl_div(s.log_softmax(-1), logq, log_target=True, reduction="sum")
        loss = (1 - cfg.alpha) * ce_sum + cfg.alpha * cfg.temperature ** 2 * kl
        if h_s is not None and h_t is not None and logits.dim() == 3:
            hs, ht = _wide(h_s[keep]), _wide(h_t[keep])
            d = ((hs - ht).square().mean(-1) if cfg.hidden_loss == "mse"
                 else 1 - F.cosine_similarity(hs, ht, dim=-1))
            loss = loss + cfg.hidden_weight * d.sum()
        return LossPieces(loss, ce_sum, aux)
