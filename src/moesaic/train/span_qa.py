"""The task of extractive QA models (``model.task == "span_qa"``): start/end cross-entropy, exact match and F1.

SQuAD (Rajpurkar et al. 2016): the loss is the cross-entropy of the start position plus that of the end
position; the prediction is the span ``i <= j < i + max_answer_tokens`` with the highest ``start_i + end_j``
(BERT's decoding, Devlin et al. 2019). Exact match: the predicted span is the gold one; F1: the harmonic mean of
precision and recall of the predicted span's tokens against the gold span's (SQuAD's F1 on word pieces; the
``shakespeare_qa`` answers occur once per passage, so positions and text agree).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moesaic.train.loss import IGNORE_INDEX, count_tokens
from moesaic.train.task import LMTask


def best_spans(logits_B2S: Tensor, max_answer_tokens: int) -> Tensor:
    """``[B, 2]``: the (start, end) with ``start <= end < start + max_answer_tokens`` of the highest summed score."""
    s_BS, e_BS = logits_B2S[:, 0].double(), logits_B2S[:, 1].double()
    S = s_BS.shape[1]
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    ok_SS = (j >= i) & (j < i + max_answer_tokens)
    score_BSS = (s_BS[:, :, None] + e_BS[:, None, :]).masked_fill(~ok_SS.to(s_BS.device), float("-inf"))
    flat = score_BSS.flatten(1).argmax(1)
    return torch.stack([flat // S, flat % S], 1)


def span_em_f1(pred_B2: Tensor, gold_B2: Tensor) -> tuple[Tensor, Tensor]:
    """Per example: exact match (0/1) and token-overlap F1 of predicted and gold ``(start, end)`` spans."""
    inter = (torch.minimum(pred_B2[:, 1], gold_B2[:, 1]) - torch.maximum(pred_B2[:, 0], gold_B2[:, 0]) + 1).clamp_min(0)
    n_pred = pred_B2[:, 1] - pred_B2[:, 0] + 1
    n_gold = gold_B2[:, 1] - gold_B2[:, 0] + 1
    f1 = torch.where(inter > 0, 2 * inter / (n_pred + n_gold), torch.zeros_like(inter)).double()
    return (pred_B2 == gold_B2).all(1).double(), f1


class SpanQATask(LMTask):
    """Start + end cross-entropy (summed; two targets per question); eval ``val_em`` and ``val_f1``."""

    kind = "span_qa"

    def __init__(self, max_answer_tokens: int = 8):
        self.max_answer_tokens = max_answer_tokens

    def loss_sum(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
        dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        ce = F.cross_entropy(logits.transpose(1, 2).to(dt), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return ce, int((labels != IGNORE_INDEX).sum())

    def throughput_tokens(self, batch: dict[str, Tensor], num_targets: int) -> int:
        return count_tokens(batch) if num_targets > 0 else 0

    def eval_update(self, sums: dict[str, float], logits: Tensor, labels: Tensor) -> None:
        super().eval_update(sums, logits, labels)
        em, f1 = span_em_f1(best_spans(logits, self.max_answer_tokens), labels)
        sums["em"] = sums.get("em", 0.0) + float(em.sum())
        sums["f1"] = sums.get("f1", 0.0) + float(f1.sum())
        sums["questions"] = sums.get("questions", 0) + int(labels.shape[0])

    def eval_result(self, sums: dict[str, float]) -> dict[str, float]:
        q = max(sums.get("questions", 0), 1)
        return {"val_loss": sums.get("loss", 0.0) / max(sums.get("n", 0), 1), "val_em": sums.get("em", 0.0) / q,
                "val_f1": sums.get("f1", 0.0) / q}

    def eval_line(self, m: dict[str, float]) -> str:
        return f"val_loss {m['val_loss']:.4f} (start/end CE)  exact_match {m['val_em']:.4f}  f1 {m['val_f1']:.4f}"
