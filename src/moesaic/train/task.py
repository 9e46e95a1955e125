"""What a run is trained for: the loss of a batch and the evaluation metrics, by model/dataset pair.

* :class:`LMTask` (a language model on a token-stream dataset): summed token cross-entropy over labels
  ``[B, S]`` (shifted inputs, ``-100`` ignored); eval ``val_loss`` (mean token CE) and ``val_ppl``.
* :class:`ClassificationTask` (a sequence classifier, e.g. ``encoder_classifier``, on a labelled dataset
  such as ``shakespeare_genre``): summed cross-entropy over sequences, labels ``[B]``; eval ``val_loss``
  (mean CE per sequence) and ``val_accuracy``.

Both return ``(summed loss, number of valid targets)`` from :meth:`loss_sum`, which is all the step
objective of :mod:`moesaic.train.loss` needs: the step loss stays the mean over every valid target of
the step (tokens for an LM, sequences for a classifier), exact under gradient accumulation.
:func:`select_task` takes the task the model config declares (``ModelConfig.task``) and rejects a dataset of
another kind with a :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.core.errors import ConfigError
from moesaic.train.loss import IGNORE_INDEX, count_tokens, lm_loss_sum


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The keywords of the model's forward in ``batch``: everything but the targets."""
    return {k: v for k, v in batch.items() if k != "labels" and v is not None}


class LMTask:
    kind = "lm"

    def logits(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The model's output on ``batch``: every entry but ``labels`` is a keyword of the model's forward
        (``input_ids`` and ``attention_mask``; ``pixel_values`` and ``task_id`` for images)."""
        return model(**model_inputs(batch)).logits

    def loss_sum(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
        return lm_loss_sum(logits, labels)

    def throughput_tokens(self, batch: dict[str, Tensor], num_targets: int) -> int:
        """Tokens counted for ``tokens_per_s``: the valid targets (the trainer's historical definition)."""
        return num_targets

    def eval_update(self, sums: dict[str, float], logits: Tensor, labels: Tensor) -> None:
        s, n = self.loss_sum(logits, labels)
        sums["loss"] = sums.get("loss", 0.0) + float(s)
        sums["n"] = sums.get("n", 0) + n

    def eval_result(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums.get("loss", 0.0) / max(sums.get("n", 0), 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def eval_line(self, m: dict[str, float]) -> str:
        return f"val_loss {m['val_loss']:.4f} (ppl {m['val_ppl']:.1f})"


def classification_loss_sum(logits_BL: Tensor, labels_B: Tensor) -> tuple[Tensor, int]:
    """Summed cross-entropy over sequences with a label (``-100`` ignored; fp32, or fp64 for fp64 logits)
    and the number of such sequences."""
    dt = torch.float64 if logits_BL.dtype == torch.float64 else torch.float32
    ce = F.cross_entropy(logits_BL.to(dt), labels_B, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce, int((labels_B != IGNORE_INDEX).sum())


class ClassificationTask(LMTask):
    kind = "classification"

    def __init__(self, num_labels: int, label_names: tuple[str, ...] | None = None):
        self.num_labels, self.label_names = num_labels, label_names

    def loss_sum(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
        return classification_loss_sum(logits, labels)

    def throughput_tokens(self, batch: dict[str, Tensor], num_targets: int) -> int:
        """Input tokens the model read (a classifier has one target per sequence)."""
        return count_tokens(batch) if num_targets > 0 else 0

    def eval_update(self, sums: dict[str, float], logits: Tensor, labels: Tensor) -> None:
        super().eval_update(sums, logits, labels)
        valid = labels != IGNORE_INDEX
        sums["correct"] = sums.get("correct", 0) + int((logits.argmax(-1)[valid] == labels[valid]).sum())

    def eval_result(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("n", 0), 1)
        return {"val_loss": sums.get("loss", 0.0) / n, "val_accuracy": sums.get("correct", 0) / n}

    def eval_line(self, m: dict[str, float]) -> str:
        return f"val_loss {m['val_loss']:.4f}  val_accuracy {m['val_accuracy']:.4f}"


class ForecastTask(LMTask):
    """Point forecasts: squared error summed over every target that exists (NaN targets are not counted)."""

    kind = "forecast"

    def loss_sum(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
        valid = ~labels.isnan()
        dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        err = (logits.to(dt) - labels.to(dt).nan_to_num(0.0)) * valid
        return (err * err).sum(), int(valid.sum())

    def throughput_tokens(self, batch: dict[str, Tensor], num_targets: int) -> int:
        """Time steps read (every position of every window)."""
        return int(batch["past_values"].numel()) if num_targets > 0 else 0

    def eval_update(self, sums: dict[str, float], logits: Tensor, labels: Tensor) -> None:
        super().eval_update(sums, logits, labels)
        valid = ~labels.isnan()
        sums["abs"] = sums.get("abs", 0.0) + float(((logits - labels.nan_to_num(0.0)).abs() * valid).sum())

    def eval_result(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("n", 0), 1)
        return {"val_loss": sums.get("loss", 0.0) / n, "val_mae": sums.get("abs", 0.0) / n}

    def eval_line(self, m: dict[str, float]) -> str:
        return f"val_loss {m['val_loss']:.4f} (MSE, normalised)  val_mae {m['val_mae']:.4f}"


class DenoiseTask(ForecastTask):
    """Diffusion training: squared error of the predicted noise (the DDPM objective, Ho et al. 2020)."""

    kind = "denoise"

    def throughput_tokens(self, batch: dict[str, Tensor], num_targets: int) -> int:
        """Images denoised (one example per image)."""
        return int(batch["labels"].shape[0]) if num_targets > 0 else 0

    def eval_line(self, m: dict[str, float]) -> str:
        return f"val_loss {m['val_loss']:.4f} (noise MSE)  val_mae {m['val_mae']:.4f}"


def select_task(cfg: Any, data: Any) -> LMTask:
    """The task of run config ``cfg`` (``model``, ``data`` sections) with the built dataset ``data``: the one
    the model config declares (``ModelConfig.task``); the dataset must provide it."""
    declared = getattr(type(cfg.model), "task", None)
    data_classes = getattr(data, "num_labels", None)
    if declared == "classification":
        if data_classes is None:
            raise ConfigError("data.kind", cfg.data.kind, f"model.kind {cfg.model.kind} is a classifier and "
                              "needs a classification dataset (e.g. shakespeare_genre)")
        if cfg.model.num_labels != data_classes:
            raise ConfigError("model.num_labels", cfg.model.num_labels,
                              f"must equal the number of classes of data.kind {cfg.data.kind} ({data_classes})")
        return ClassificationTask(data_classes, tuple(getattr(data, "label_names", ()) or ()) or None)
    if declared == "forecast":
        if getattr(data, "horizon", None) != getattr(cfg.model, "horizon", None):
            raise ConfigError("model.horizon", getattr(cfg.model, "horizon", None),
                              f"must equal data.horizon of a forecasting dataset (data.kind {cfg.data.kind}: "
                              f"{getattr(data, 'horizon', 'not a forecasting dataset')})")
        return ForecastTask()
    if declared == "denoise":
        for f in ("diffusion_steps", "beta_start", "beta_end"):
            if getattr(cfg.data, f, None) != getattr(cfg.model, f):
                raise ConfigError(f"data.{f}", getattr(cfg.data, f, None),
                                  f"must equal model.{f} ({getattr(cfg.model, f)}): the data noises images with "
                                  "the schedule the model denoises")
        return DenoiseTask()
    if declared == "embedding":
        from moesaic.train.retrieval import EmbeddingTask

        if not getattr(data, "contrastive", False):
            raise ConfigError("data.kind", cfg.data.kind, f"model.kind {cfg.model.kind} is a sentence encoder and "
                              "needs a contrastive dataset of positive pairs (e.g. shakespeare_passages)")
        return EmbeddingTask()
    if declared == "span_qa":
        from moesaic.train.span_qa import SpanQATask

        if not getattr(data, "span_qa", False):
            raise ConfigError("data.kind", cfg.data.kind, f"model.kind {cfg.model.kind} answers span questions and "
                              "needs a span QA dataset (e.g. shakespeare_qa)")
        return SpanQATask()
    if getattr(data, "span_qa", False):
        raise ConfigError("model.kind", cfg.model.kind, f"data.kind {cfg.data.kind} serves span questions and needs "
                          "a span QA model (e.g. span_qa)")
    if getattr(data, "contrastive", False):
        raise ConfigError("model.kind", cfg.model.kind, f"data.kind {cfg.data.kind} serves contrastive pairs and "
                          "needs a sentence encoder (e.g. sentence_encoder)")
    if declared != "lm":
        raise ConfigError("model.kind", cfg.model.kind, f"declares the task {declared!r}; the trainer trains "
                          "language models (task lm), classifiers (task classification), forecasters "
                          "(task forecast), denoisers (task denoise), sentence encoders (task embedding) and span QA "
                          "models (task span_qa)")
    if data_classes is not None:
        raise ConfigError("model.kind", cfg.model.kind, f"data.kind {cfg.data.kind} is a classification dataset "
                          "and needs a classifier model (e.g. encoder_classifier)")
    if not hasattr(data, "loader"):
        raise ConfigError("data.kind", cfg.data.kind, "the trainer needs a language-model dataset (shakespeare) "
                          "or a classification dataset (shakespeare_genre)")
    return LMTask()


def eval_batch_size(train_cfg: Any) -> int:
    """Sequences per eval forward: ``train.eval_batch_size``, else the micro-batch size. (Routers that pick
    over the whole batch, like expert choice, make results depend on it; trainer and ``moesaic eval`` agree.)"""
    return train_cfg.eval_batch_size or train_cfg.batch_size // train_cfg.grad_accum


@torch.no_grad()
def evaluate(model: nn.Module, task: LMTask, batches: Iterable[dict[str, Tensor]],
             autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
    """The task's eval metrics of ``model`` over ``batches`` (eval mode during the pass, mode restored)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    try:
        for b in batches:
            with autocast():
                logits = task.logits(model, b)
            task.eval_update(sums, logits, b["labels"])
    finally:
        model.train(was_training)
    return task.eval_result(sums)
