"""Non-finite training steps: detect NaN/inf in a step, name the step and the layer, apply the policy.

``train.on_nonfinite`` says what the trainer does when a step's loss or gradients are not finite (an
overflow, a bad weight, a hardware fault):

* ``stop`` (default): raise :class:`NonFiniteTrainingError` before the optimizer touches the weights; the
  last checkpoint stays the newest state on disk;
* ``skip_step``: drop the step's gradients, skip the update and go on with the next batch (as loss-scaling
  trainers skip overflowed steps, Micikevicius et al. 2018, "Mixed Precision Training"); a non-finite
  *weight* cannot be skipped away and stops the run;
* ``rollback``: reload the newest valid checkpoint (model, optimizer, data position, RNG) and continue; a
  second failure at the same step, or no checkpoint to go back to, stops the run.

The layer is found by forward hooks on the blocks (the model's children and the entries of its module
lists) that record the first block whose output is not finite, and by scanning weights and gradients when
a step fails: a non-finite weight is named first, then the first block whose activations were not finite,
then the first parameter with a non-finite gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

POLICIES = ("stop", "skip_step", "rollback")


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children and the entries of every ModuleList (transformer layers, experts' blocks)."""
    out: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if not name:
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if "." not in name or isinstance(model.get_submodule(parent), nn.ModuleList):
            out.append((name, m))
    return out


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return getattr(x, "logits", None) if not isinstance(x, dict) else x.get("logits")


class NonFiniteGuard:
    """Hooks on the blocks of ``model``; :meth:`check` after the backward says what is not finite."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.first_activation: str | None = None
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in _blocks(model)]

    def _hook(self, name: str) -> Any:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            if self.first_activation is not None or not torch.is_grad_enabled():
                return
            t = _first_tensor(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                self.first_activation = name
        return hook

    def reset(self) -> None:
        self.first_activation = None

    def check(self, loss: float, router_error: str | None = None) -> str | None:
        """None when the loss and every gradient are finite; else where the first non-finite value is.
        ``router_error``: the message of a :class:`NonFiniteInputError` a router raised during the step."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if math.isfinite(loss) and (not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())):
            return None
        bad_weight = self.nonfinite_weight()
        if bad_weight is not None:
            return f"weight {bad_weight}"
        if self.first_activation is not None:
            return f"activations of layer {self.first_activation}"
        if router_error is not None:
            return f"activations ({router_error})"
        for n, p in self.model.named_parameters():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return f"gradient of {n}"
        return "loss"

    def nonfinite_weight(self) -> str | None:
        for n, p in self.model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                return n
        return None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
