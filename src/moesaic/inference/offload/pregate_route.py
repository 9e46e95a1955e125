"""Routing by the pre-gate: the paper's variant of Pre-gated MoE, which changes outputs.

Hwang et al. 2024 ("Pre-gated MoE: An Algorithm-System Co-Design for Fast and Scalable Mixture-of-Expert
Inference") select layer l+1's experts with a gate evaluated on layer l's input, so the selection is known
one layer early and the experts can be loaded while layer l computes. :func:`route_by_pregate_` does this
with the trained routers, without fine-tuning: every MoE layer after the first is routed by its own
router applied to the *previous* MoE layer's input (captured by a forward pre-hook); the first MoE layer
keeps its routing. With ``prefetch="pregate"`` the prefetch hint then equals the routing (hint precision 1).
The paper fine-tunes the pre-gates; without that, quality drops (measured: docs/benchmarks.md).

``h = route_by_pregate_(model)`` returns a handle; ``h.restore()`` puts the routers back (exact).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from moesaic.core.errors import ConfigError, RoutingInputError
from moesaic.core.types import RoutingDecision
from moesaic.moe.layer import MoELayer


class _Capture:
    """The flattened input of one MoE layer's latest forward."""

    def __init__(self, d_model: int):
        self.d_model = d_model
        self.x_TD: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.x_TD = args[0].reshape(-1, self.d_model)


class PreGatedRouter(nn.Module):
    """A layer's router evaluated on the previous MoE layer's input (captured), not on its own."""

    def __init__(self, inner: nn.Module, source: _Capture, source_name: str):
        super().__init__()
        self.inner, self.source, self.source_name = inner, source, source_name

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, x_TD: Tensor, mask_T: Tensor | None = None, **ctx: Any) -> RoutingDecision:
        x_prev = self.source.x_TD
        if x_prev is None or x_prev.shape != x_TD.shape:
            raise RoutingInputError(f"{getattr(self.inner, 'layer_name', '?')}: routed by the pre-gate on the input "
                                    f"of {self.source_name}, which did not run on these tokens")
        decision: RoutingDecision = self.inner(x_prev, mask_T, **ctx)
        return decision


class PreGateRouting:
    """What :func:`route_by_pregate_` returns: ``restore()`` undoes it."""

    def __init__(self, layers: list[tuple[MoELayer, nn.Module]], hooks: list[RemovableHandle]):
        self.layers, self.hooks = layers, hooks

    def restore(self) -> None:
        for layer, router in self.layers:
            layer.router = router
        for h in self.hooks:
            h.remove()
        self.layers, self.hooks = [], []


def route_by_pregate_(model: nn.Module) -> PreGateRouting:
    """Route every MoE layer but the first by its router on the previous MoE layer's input (module docstring)."""
    moe = [(n or "moe", m) for n, m in model.named_modules() if isinstance(m, MoELayer)]
    if len(moe) < 2:
        raise ConfigError("pregate_route", len(moe), "needs at least two MoE layers")
    swapped: list[tuple[MoELayer, nn.Module]] = []
    hooks: list[RemovableHandle] = []
    for (prev_name, prev), (_, layer) in zip(moe, moe[1:], strict=False):
        if prev.d_model != layer.d_model:
            raise ConfigError("pregate_route", prev_name, "consecutive MoE layers must share d_model")
        cap = _Capture(prev.d_model)
        hooks.append(prev.register_forward_pre_hook(cap))
        swapped.append((layer, layer.router))
        layer.router = PreGatedRouter(layer.router, cap, prev_name)
    return PreGateRouting(swapped, hooks)
