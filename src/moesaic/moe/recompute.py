"""Activation checkpointing that runs every side effect of a forward once (Chen et al. 2016, "Training Deep
Nets with Sublinear Memory Cost").

:func:`checkpointed` runs ``fn(*args)`` under ``torch.utils.checkpoint`` (non-reentrant): the region keeps
only its inputs for backward, and backward runs the forward again to rebuild what it needs. An MoE
forward has side effects beside its output: the layer's ``aux_losses``/``aux_stats``/``last_stats``, the
routing hooks (recorders, analysis), and router buffers that count the step's load for the aux-loss-free
bias update. The recomputation must not run them a second time, so while it runs:

* :func:`recomputing` is True, and :class:`~moesaic.moe.layer.MoELayer` skips its bookkeeping and hooks
  (the first forward's values stay);
* every buffer of ``module`` is restored afterwards to its value before the recomputation (a router
  that counts load in a buffer, including plugins that do not know about this module, counts once).

Recomputation reproduces the first forward exactly (same ops in the same order on the same inputs, RNG
state restored by ``torch.utils.checkpoint``), so gradients and losses are bitwise those of the run
without checkpointing (tested on the demo model).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("moesaic_recomputing", default=False)


def recomputing() -> bool:
    """True while activation checkpointing recomputes a forward (side effects must be skipped)."""
    return _RECOMPUTING.get()


@contextlib.contextmanager
def _recompute_context(module: nn.Module) -> Iterator[None]:
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def checkpointed(module: nn.Module, fn: Callable[..., Tensor], *args: Any) -> Tensor:
    """``fn(*args)`` with activation checkpointing; ``module`` owns the buffers restored after the
    recomputation (see the module docstring). Outside grad mode it is a plain call."""
    if not torch.is_grad_enabled():
        return fn(*args)
    out: Tensor = checkpoint(fn, *args, use_reentrant=False,
                             context_fn=lambda: (contextlib.nullcontext(), _recompute_context(module)))
    return out


__all__ = ["checkpointed", "recomputing"]
