"""The small public API: the ``moe_layer`` shortcut and model-wide helpers."""

from __future__ import annotations

from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from moesaic.core.config import parse, validate_tree
from moesaic.moe.layer import MoEConfig, MoELayer


def moe_layer(d_model: int, d_ff: int, num_experts: int, top_k: int = 2, **options: Any) -> MoELayer:
    """Build an :class:`MoELayer` with sensible defaults: softmax top-k with renormalised weights,
    SwiGLU experts, dropless sort dispatch, the fastest backend. ``options`` are :class:`MoEConfig`
    fields (nested ones as dicts, e.g. ``router={"kind": "topk", "score_func": "sigmoid"}``) plus
    ``causal``. Accepts ``[T, D]`` or ``[B, S, D]`` and returns the same shape.
    """
    causal = bool(options.pop("causal", False))
    data = {"d_ff": d_ff, "num_experts": num_experts, "top_k": top_k, **options}
    cfg = validate_tree(parse(MoEConfig, data, "moe"), "moe")
    return MoELayer(cfg, d_model, causal=causal)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def name_layers(model: nn.Module) -> None:
    """Give every MoE layer its module path as name (used in error messages and statistics) and link
    components that chain across layers (``link_previous``)."""
    for name, m in model.named_modules():
        if isinstance(m, MoELayer):
            m.layer_name = name or "moe"
    # Components that chain across layers (MoE++ gating residuals) get their predecessor of the same
    # class in module order (= layer order for the models here); the first one gets None.
    previous: dict[type[nn.Module], nn.Module] = {}
    for m in model.modules():
        link = getattr(m, "link_previous", None)
        if callable(link):
            link(previous.get(type(m)))
            previous[type(m)] = m


@overload
def collect_aux_losses(model: nn.Module, by_name: Literal[False] = False) -> Tensor: ...
@overload
def collect_aux_losses(model: nn.Module, by_name: Literal[True]) -> dict[str, Tensor]: ...
@overload
def collect_aux_losses(model: nn.Module, by_name: bool) -> Tensor | dict[str, Tensor]: ...


def collect_aux_losses(model: nn.Module, by_name: bool = False) -> Tensor | dict[str, Tensor]:
    """Sum of the weighted aux losses of every module's last forward (0 if none).

    Each forward *replaces* a layer's losses, so calling this after every forward (every micro-batch)
    is correct under gradient accumulation, and nothing depends on a logging flag.
    """
    total: dict[str, Tensor] = {}
    for m in model.modules():
        for n, v in getattr(m, "aux_losses", {}).items():
            total[n] = total[n] + v if n in total else v
    if by_name:
        return total
    if not total:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return sum(total.values())  # type: ignore[return-value]


def on_optimizer_step(model: nn.Module, step: int) -> None:
    """Tell every component that an optimizer step finished (bias balancing, schedules, EWA)."""
    for m in model.modules():
        hook = getattr(m, "on_optimizer_step", None)
        if hook is not None:
            hook(step)
