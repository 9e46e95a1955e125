"""``train.aux_accumulation``: how batch-statistic aux losses are accumulated over micro-batches and ranks.

``exact`` (default): the aux loss of a step is the one of the whole step batch (docs/training.md, "Loss
under accumulation and padding"); when ``grad_accum > 1`` and some router has a batch-statistic loss with a
non-zero coefficient, every step runs the no-grad pre-pass of :func:`moesaic.train.exact_aux.aux_totals`
(every router loss is a statistic object, so every one splits exactly). ``micro_batch``: each micro-batch's
own statistics, weighted by its routed tokens (no pre-pass; the convention of Megatron-LM and transformers).
Under data/expert parallelism the statistics of each forward (or the pre-pass totals) are summed over the
ranks, so a step equals one process's (docs/parallel.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

from torch import nn

from moesaic.core.errors import ConfigError
from moesaic.distributed.groups import group_size
from moesaic.moe.api import moe_layers
from moesaic.moe.layer import MoELayer
from moesaic.moe.routing.base import Router
from moesaic.train.exact_aux import AuxFn, RunFn, aux_totals, global_aux


def _losses(model: nn.Module) -> Iterator[tuple[str, str, str, Router]]:
    """``(layer, router kind, loss, router)`` for every router aux loss with a non-zero coefficient."""
    for layer in moe_layers(model):
        r = cast(Router, layer.router)
        kind = getattr(getattr(r, "cfg", None), "kind", type(r).__name__)
        for name, coef in r.loss_coefs().items():
            if coef > 0:
                yield layer.layer_name, kind, name, r


def batch_stat_losses(model: nn.Module) -> list[tuple[str, str, str]]:
    """``(layer, router kind, loss)`` for every aux loss with a non-zero coefficient of a router whose split
    batches need the batch totals (``Router.needs_batch_totals``: anything but a token mean such as the z-loss)."""
    return [(n, k, loss) for n, k, loss, r in _losses(model) if r.needs_batch_totals()]


def _may_emit(m: nn.Module) -> bool:
    """Whether a module outside the MoE layers may hold aux losses: not when its router weighs every loss by 0
    (BAM's soft-routed attention experts, docs/convert.md)."""
    r = getattr(m, "router", None)
    return not isinstance(r, Router) or any(c > 0 for c in r.loss_coefs().values())


class AuxAccumulation:
    """Per trainer: whether steps need the pre-pass, and the aux function of each micro-batch's forwards."""

    def __init__(self, model: nn.Module, mode: str, grad_accum: int, group: Any = None):
        self.model, self.group = model, group
        self.prepass = False
        if mode != "exact" or (grad_accum == 1 and group_size(group) == 1):
            return
        others = [n for n, m in model.named_modules() if hasattr(m, "aux_losses") and not isinstance(m, MoELayer)
                  and _may_emit(m)]
        if others:
            raise ConfigError(others[0], None, "holds aux losses outside an MoE layer, which exact aux accumulation "
                              "cannot split; set train.aux_accumulation: micro_batch", show_value=False)
        self.prepass = grad_accum > 1 and bool(batch_stat_losses(model))

    def collectors(self, micro: list[Any], run: RunFn) -> tuple[list[AuxFn], bool]:
        """One aux function per micro-batch, and whether they return shares of the whole step (True: add them
        as they are) or of their own micro-batch (weigh them by the micro-batch's token share)."""
        if self.prepass:
            totals = aux_totals(self.model, micro, run, self.group)
            return [totals.collector(i) for i in range(len(micro))], True
        return [global_aux(self.group)] * len(micro), False
