"""``train.aux_accumulation``: how batch-statistic aux losses are accumulated over micro-batches.

``exact`` (default): the aux loss of a step is the one of the whole step batch (:mod:`moesaic.train.loss`);
when ``grad_accum > 1`` and some router has a batch-statistic loss with a non-zero coefficient, every step
runs a no-grad pre-pass over its micro-batches (:class:`moesaic.train.global_aux.GlobalAux`). A router
loss that is neither a token mean nor declared as additive statistics is rejected here, at trainer
construction (reliability.md §3.1). ``micro_batch``: each micro-batch's own statistics, weighted by its
routed tokens (no pre-pass; the convention of Megatron-LM and transformers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from moesaic.core.errors import ConfigError
from moesaic.moe.layer import MoELayer
from moesaic.train.global_aux import ATTR, GlobalAux, _group_size, batch_stat_losses, unsplittable_losses


class AuxAccumulation:
    """Per-trainer state: whether steps need the pre-pass, and the model's :class:`GlobalAux` (if any)."""

    def __init__(self, model: nn.Module, mode: str, grad_accum: int):
        self.model = model
        self.global_aux: GlobalAux | None = getattr(model, ATTR, None)  # installed by expert parallelism
        ranks = _group_size(self.global_aux.batch_group) if self.global_aux is not None else 1
        self.prepass = False
        if mode != "exact" or (grad_accum == 1 and ranks == 1):
            return
        bad = unsplittable_losses(model)
        if bad:
            layer, kind, loss = bad[0]
            raise ConfigError(f"{layer}.router", kind, f"its aux loss {loss!r} is a batch statistic that cannot be "
                              "accumulated exactly over micro-batches or ranks (reliability.md §3.1); set "
                              "train.aux_accumulation: micro_batch to use each micro-batch's own statistics")
        others = [n for n, m in model.named_modules() if hasattr(m, "aux_losses") and not isinstance(m, MoELayer)]
        if others:
            raise ConfigError(others[0], None, "holds aux losses outside an MoE layer, which exact aux accumulation "
                              "cannot split; set train.aux_accumulation: micro_batch", show_value=False)
        if grad_accum > 1 and batch_stat_losses(model):
            self.global_aux = GlobalAux.install(model)
            self.prepass = True

    def next_micro(self) -> None:
        if self.global_aux is not None:
            self.global_aux.next_micro()

    @contextlib.contextmanager
    def step(self, micro: list[Any], forward: Callable[[Any], Any], enabled: bool = True) -> Iterator[bool]:
        """Pre-pass for the step (when needed and ``enabled``); yields True when the aux losses of the
        micro-batches' forwards are now their shares of the step's (no further weighting)."""
        if not (self.prepass and enabled):
            yield False
            return
        assert self.global_aux is not None
        with self.global_aux.step(self.model, micro, forward) as exact:
            yield exact
