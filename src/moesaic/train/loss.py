"""The training objective of one optimizer step, exact under gradient accumulation and padding.

Definition. A step sees micro-batches ``m = 1..M``; micro-batch ``m`` has ``n_m`` valid targets
(labels != -100, ``N = sum n_m``) and ``t_m`` real input tokens (attention_mask, i.e. the tokens the routers
see; ``T = sum t_m``). The step loss is

    L = sum_m [ CE_sum_m / N + (t_m / T) * aux_m ]

where ``CE_sum_m`` is the summed token cross-entropy of micro-batch ``m`` and ``aux_m`` the weighted MoE
aux losses of its forward (:func:`moesaic.collect_aux_losses`). So the LM loss is the mean over every
valid target of the step, however the step is split (the fix for the "mean of micro-batch means" bug),
and each micro-batch's aux counts in proportion to the tokens that were routed in it. Aux losses that
are token means (router z-loss, per-token losses) are therefore identical for ``M x b`` and ``1 x M*b``;
a balance loss built
from batch statistics (Switch ``E * sum_i f_i P_i``) is by definition a statistic of the micro-batch it
was computed on (as in Megatron-LM and transformers), and the step averages it token-weighted.
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
    return int((labels_BS != IGNORE_INDEX).sum())


def count_tokens(batch: dict[str, Tensor]) -> int:
    """Real input tokens (the ones routers see): the attention mask's sum, or every position."""
    m = batch.get("attention_mask")
    return int(m.sum()) if m is not None else int(batch["input_ids"].numel())
