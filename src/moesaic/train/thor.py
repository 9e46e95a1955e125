"""The THOR training step: two stochastic passes and the consistency regulariser (routing.md §4).

``L = CE(pass 1) + CE(pass 2) + alpha * CR`` with ``CR`` from
:func:`moesaic.moe.routing.thor.thor_consistency_loss` (Zuo et al. 2022; ``thor/translation_thor.py``).
The code's IWSLT'14 script uses ``alpha = 5`` and label smoothing 0.1; the config default is 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from moesaic.moe.api import collect_aux_losses
from moesaic.moe.routing.thor import thor_consistency_loss
from moesaic.train.loss import IGNORE_INDEX, lm_loss_sum

#: ``loss_fn(model, batch) -> (ce, logits, mask)``: one forward pass; ``mask`` may be None.
PassFn = Callable[[nn.Module, Any], tuple[Tensor, Tensor, Tensor | None]]


@dataclass
class ThorStepOutput:
    loss: Tensor  # ce1 + ce2 + alpha * cr + aux of both passes: call backward() on this
    ce1: Tensor
    ce2: Tensor
    cr: Tensor
    aux: Tensor  # the routers' weighted aux losses of both passes (0 for pure THOR layers)


def thor_step(model: nn.Module, batch: Any, loss_fn: PassFn, alpha: float = 1.0) -> ThorStepOutput:
    """Run two stochastic forward passes of ``model`` on ``batch`` and combine them.

    Each pass draws its own experts (THOR routers use torch's global generator), so the two passes
    differ; with one expert and dropout off they are identical and ``loss = 2 * CE``. The aux losses of
    each pass are collected right after it (each forward replaces a layer's losses).
    """
    ce1, logits1, mask1 = loss_fn(model, batch)
    aux1 = collect_aux_losses(model)
    ce2, logits2, _ = loss_fn(model, batch)
    aux2 = collect_aux_losses(model)
    cr = thor_consistency_loss(logits1, logits2, mask1)
    aux = aux1 + aux2
    return ThorStepOutput(loss=ce1 + ce2 + alpha * cr.to(ce1.dtype) + aux, ce1=ce1, ce2=ce2, cr=cr, aux=aux)


def thor_lm_step(model: nn.Module, batch: dict[str, Tensor], alpha: float,
                 autocast: Callable[[], Any] | None = None) -> ThorStepOutput:
    """:func:`thor_step` for a language model batch (``input_ids``, ``labels``, optional
    ``attention_mask``): summed token cross-entropies and the consistency over positions with a label.
    Used by the trainer when ``train.consistency_alpha`` is set."""
    import contextlib

    ctx = autocast or contextlib.nullcontext

    def lm_pass(m: nn.Module, b: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        with ctx():
            logits = m(b["input_ids"], attention_mask=b.get("attention_mask")).logits
        ce_sum, _ = lm_loss_sum(logits, b["labels"])
        return ce_sum, logits, b["labels"] != IGNORE_INDEX

    return thor_step(model, batch, lm_pass, alpha)
