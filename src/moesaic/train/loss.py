"""The training objective of one optimizer step, exact under gradient accumulation and padding.

Definition. A step sees micro-batches ``m = 1..M``; micro-batch ``m`` has ``n_m`` valid targets
(labels != -100, ``N = sum n_m``) and ``t_m`` real input tokens (attention_mask, i.e. the tokens the routers
see; ``T = sum t_m``). The step loss is

    L = sum_m CE_sum_m / N  +  AUX(step batch)

where ``CE_sum_m`` is the summed token cross-entropy of micro-batch ``m`` and ``AUX`` the weighted MoE aux
losses (:func:`moesaic.collect_aux_losses`) *of the whole step batch*, as if it were one forward of
``M * b`` sequences. So the LM loss is the mean over every valid target of the step, however the step is
split (the fix for the "mean of micro-batch means" bug), and so is every aux loss, including the
batch-statistic balance losses (Switch/GShard/DeepSeek ``E * sum_e f_e P_e``, the CV^2 of importance and
load, the sequence-wise loss): ``M x b`` and ``1 x M*b`` give the same loss and gradients (tested to
1e-12 in float64 with unequal valid tokens per micro-batch, tests/train/test_accumulation_exact.py).

How. Micro-batch ``m``'s objective reports its *share* ``aux_m`` of ``AUX`` with ``sum_m aux_m = AUX`` and
``sum_m d aux_m = d AUX``, and the trainer adds ``CE_sum_m / N + aux_m`` (no further weighting). Token
means (z-loss, entropy) have share ``(t_m / T) * mean_m``; a batch-statistic loss ``L(S)`` of additive
statistics ``S = sum_m S_m`` has the linearised share ``(t_m/T) L(S) + g . (S_m - (t_m/T) S)``,
``g = dL/dS`` (:mod:`moesaic.moe.routing.aux_stats`); the step totals ``S`` come from a no-grad **pre-pass**
over the step's micro-batches (:func:`moesaic.train.exact_aux.aux_totals`: RNG and MoE buffers restored,
so the real pass routes identically). The pre-pass runs only when ``grad_accum > 1`` and a router has a
batch-statistic loss with a non-zero coefficient (docs/training.md gives its cost). Without it (only
token-mean aux losses, or ``grad_accum: 1``) the trainer weighs each micro-batch's aux by ``t_m / T``
itself, which is the same share. Under expert/data parallelism the statistics (or the pre-pass totals) are
all-reduced over the ranks, so the step equals one process's.

``train.aux_accumulation: micro_batch`` keeps the cheaper definition of Megatron-LM and transformers:
``L = sum_m [CE_sum_m / N + (t_m / T) * aux_m]`` with ``aux_m`` the aux losses of micro-batch ``m``'s own
statistics (identical for token means; for balance losses a statistic of each micro-batch, averaged
token-weighted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def lm_loss_sum(logits_BSV: Tensor, labels_BS: Tensor) -> tuple[Tensor, int]:
    """Summed cross-entropy over valid labels (computed in fp32 or fp64) and the number of valid labels."""
    dt = torch.float64 if logits_BSV.dtype == torch.float64 else torch.float32
    ce = F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]).to(dt), labels_BS.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="sum")
    return ce, int((labels_BS != IGNORE_INDEX).sum())


def count_valid(labels_BS: Tensor) -> int:
    """Targets that count: labels other than -100 (class ids), or values other than NaN (forecasts)."""
    if labels_BS.is_floating_point():
        return int((~labels_BS.isnan()).sum())
    return int((labels_BS != IGNORE_INDEX).sum())


def count_tokens(batch: dict[str, Tensor]) -> int:
    """Real input tokens (the ones routers see): the attention mask's sum, or every position; for data
    without token ids (images: every example has the same number of patches) the number of examples."""
    m = batch.get("attention_mask")
    if m is not None:
        return int(m.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if ids is not None else int(batch["labels"].shape[0])
