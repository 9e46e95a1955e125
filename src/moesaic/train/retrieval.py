"""Contrastive sentence embeddings: the in-batch InfoNCE loss and same-label retrieval recall@k.

* :func:`info_nce_sum`: InfoNCE (van den Oord et al. 2018) with in-batch negatives, as SimCLR's NT-Xent (Chen et
  al. 2020) and SimCSE (Gao et al. 2021) use it: rows ``2i`` and ``2i + 1`` are a positive pair, every other row
  of the batch a negative, ``-log softmax_j(cos(e_r, e_j) / tau)[partner(r)]`` over ``j != r``, summed over the
  rows. Rows with the same label as the anchor other than its partner are left out of the negatives (they are
  not negatives: same play). Every row with a partner is an anchor (the symmetric loss).
* :func:`recall_at_k`: for every embedding, are any of its k nearest other embeddings (cosine) of its label?
  The standard retrieval recall@k (e.g. Hallee et al. 2024 report it for their MoE embeddings).
* :class:`EmbeddingTask`: the trainer's task for ``model.task == "embedding"`` (``sentence_encoder``): its loss is
  :func:`info_nce_sum` at ``temperature``, its eval ``val_loss`` and ``val_recall@k`` for ``ks`` over every
  held-out passage at once. The ``infonce`` objective (:mod:`moesaic.train.objectives.infonce`) sets the training
  temperature; docs/zoo.md, "Embeddings".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moesaic.train.loss import IGNORE_INDEX, count_tokens
from moesaic.train.task import LMTask


def info_nce_sum(e_ND: Tensor, labels_N: Tensor, temperature: float) -> tuple[Tensor, int]:
    """(summed InfoNCE over the anchors, number of anchors); rows ``2i``/``2i + 1`` are pairs (module docstring).
    A row without a partner (odd count) or labelled ``-100`` is no anchor and no positive."""
    N = e_ND.shape[0]
    dt = torch.float64 if e_ND.dtype == torch.float64 else torch.float32
    e = F.normalize(e_ND.to(dt), dim=-1)
    sim_NN = e @ e.t() / temperature
    idx = torch.arange(N, device=e.device)
    partner = idx ^ 1
    has_partner = partner < N
    partner = torch.where(has_partner, partner, idx)
    same = labels_N[:, None] == labels_N[None, :]
    drop = same & (idx[None, :] != partner[:, None])  # self and same-label non-partners
    logp_NN = sim_NN.masked_fill(drop, float("-inf")).log_softmax(-1)
    anchor = has_partner & (labels_N != IGNORE_INDEX)
    loss_N = -logp_NN.gather(1, partner[:, None]).squeeze(1)
    return (loss_N * anchor).sum(), int(anchor.sum())


def recall_at_k(e_ND: Tensor, labels_N: Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    """Fraction of rows whose k nearest other rows (cosine) include one of the same label, per k."""
    e = F.normalize(e_ND.double(), dim=-1)
    sim_NN = (e @ e.t()).fill_diagonal_(float("-inf"))
    top = sim_NN.topk(min(max(ks), e.shape[0] - 1), dim=1).indices
    hit_NK = labels_N[top] == labels_N[:, None]
    return {k: float(hit_NK[:, :k].any(1).double().mean()) for k in ks}


class EmbeddingTask(LMTask):
    """Sentence embeddings trained contrastively: InfoNCE loss, retrieval recall@k on the held-out set.
    ``eval_update`` keeps every batch's embeddings until ``eval_result`` (retrieval needs all of them)."""

    kind = "embedding"

    def __init__(self, temperature: float = 0.05, ks: tuple[int, ...] = (1, 5)):
        self.temperature, self.ks = temperature, ks
        self._seen: list[tuple[Tensor, Tensor]] = []

    def loss_sum(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
        return info_nce_sum(logits, labels, self.temperature)

    def throughput_tokens(self, batch: dict[str, Tensor], num_targets: int) -> int:
        """Input tokens the encoder read."""
        return count_tokens(batch) if num_targets > 0 else 0

    def eval_update(self, sums: dict[str, float], logits: Tensor, labels: Tensor) -> None:
        super().eval_update(sums, logits, labels)
        self._seen.append((logits.detach().float().cpu(), labels.cpu()))

    def eval_result(self, sums: dict[str, float]) -> dict[str, float]:
        out = {"val_loss": sums.get("loss", 0.0) / max(sums.get("n", 0), 1)}
        seen, self._seen = self._seen, []
        if seen:
            e = torch.cat([s[0] for s in seen])
            y = torch.cat([s[1] for s in seen])
            out.update({f"val_recall@{k}": v for k, v in recall_at_k(e, y, self.ks).items()})
        return out

    def eval_line(self, m: dict[str, float]) -> str:
        rec = "  ".join(f"recall@{k} {m[f'val_recall@{k}']:.4f}" for k in self.ks if f"val_recall@{k}" in m)
        return f"val_loss {m['val_loss']:.4f} (InfoNCE, tau {self.temperature})  {rec}"
