"""Fit Read-ME-style pre-gates (Cai et al. 2024; :mod:`moesaic.moe.pregate`) on activations.

For every MoE layer (a :class:`~moesaic.moe.layer.MoELayer` or a MoEfied FFN) the hidden state entering
its block (the first positional input of the layer's parent module) and the experts the layer actually
chose are recorded while ``calibrate(model)`` runs; a :class:`PreGate` is then trained with a multi-label
cross-entropy (BCE against the chosen set) to predict that set from the earlier hidden state. The model is
not modified: the pre-gates are returned by layer path, for an inference engine to use as prefetch hints.
:func:`pregate_recall` measures the fraction of the layer's chosen experts that the pre-gate's top-k holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.config import Section, rule
from moesaic.core.errors import ConversionError
from moesaic.moe.layer import MoELayer
from moesaic.moe.moefied import MoEfiedFFN
from moesaic.moe.pregate import PreGate

FilterFn = Callable[[str, nn.Module], bool]


@dataclasses.dataclass
class PregateConfig(Section):
    hidden: int = rule(128, ge=0)
    steps: int = rule(300, ge=1)
    lr: float = rule(3e-3, gt=0.0)
    seed: int = 0


def _targets(model: nn.Module, filter_fn: FilterFn | None) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = [
        (n, m) for n, m in model.named_modules()
        if isinstance(m, (MoELayer, MoEfiedFFN)) and "." in n and (filter_fn is None or filter_fn(n, m))]
    if not found:
        raise ConversionError(f"pregate: no MoE layer found in {type(model).__name__}")
    return found


@torch.no_grad()
def record(model: nn.Module, layers: list[tuple[str, nn.Module]], calibrate: Callable[[nn.Module], object]
           ) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (hidden_prev_TD, chosen_TE multi-hot)}`` over the calibration run."""
    got: dict[str, dict[str, list[Tensor]]] = {n: {"h": [], "y": []} for n, _ in layers}
    handles: list[Any] = []
    for name, layer in layers:
        parent = model.get_submodule(name.rpartition(".")[0])

        def pre(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            got[name]["h"].append(args[0].detach().reshape(-1, args[0].shape[-1]))

        handles.append(parent.register_forward_pre_hook(pre))
        if isinstance(layer, MoELayer):
            def hook(lay: MoELayer, dec: Any, plan: Any, name: str = name) -> None:
                y = torch.zeros(dec.probs_TE.shape[0], lay.num_experts)
                y[dec.token_idx_N, dec.expert_idx_N] = 1.0
                got[name]["y"].append(y)
            handles.append(layer.register_routing_hook(hook))
        else:
            def fhook(mod: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
                assert isinstance(mod, MoEfiedFFN)
                x_TD = args[0].reshape(-1, mod.d_model)
                y = torch.zeros(x_TD.shape[0], mod.num_experts)
                y.scatter_(1, mod.select(x_TD), 1.0)
                got[name]["y"].append(y)
            handles.append(layer.register_forward_hook(fhook))
    try:
        calibrate(model)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, d in got.items():
        h, y = torch.cat(d["h"]), torch.cat(d["y"])
        if h.shape[0] != y.shape[0]:
            raise ConversionError(f"pregate: {n}'s block input ({h.shape[0]} tokens) and its routing "
                                  f"({y.shape[0]}) differ in length (padding removed by the layer?)")
        out[n] = (h, y)
    return out


def fit_pregates(model: nn.Module, cfg: PregateConfig | None = None, filter_fn: FilterFn | None = None, *,
                 calibrate: Callable[[nn.Module], object]) -> dict[str, PreGate]:
    """A trained :class:`PreGate` per MoE layer, by layer path (the model is unchanged)."""
    cfg = cfg or PregateConfig()
    data = record(model, _targets(model, filter_fn), calibrate)
    gates: dict[str, PreGate] = {}
    g = torch.Generator().manual_seed(cfg.seed)
    for name, (h_TD, y_TE) in data.items():
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            gate = PreGate(h_TD.shape[1], y_TE.shape[1], cfg.hidden).to(h_TD.dtype)
        opt = torch.optim.Adam(gate.parameters(), lr=cfg.lr)
        bs = min(1024, h_TD.shape[0])
        for _ in range(cfg.steps):
            i = torch.randint(0, h_TD.shape[0], (bs,), generator=g)
            loss = nn.functional.binary_cross_entropy_with_logits(gate(h_TD[i]), y_TE[i].to(h_TD.dtype))
            opt.zero_grad()
            loss.backward()
            opt.step()
        gates[name] = gate.eval()
    return gates


@torch.no_grad()
def pregate_recall(model: nn.Module, gates: dict[str, PreGate], calibrate: Callable[[nn.Module], object]
                   ) -> dict[str, float]:
    """Per layer: the fraction of (token, chosen expert) pairs inside the pre-gate's top-k (k = the number
    the layer chose for that token)."""
    layers = [(n, model.get_submodule(n)) for n in gates]
    data = record(model, layers, calibrate)
    out = {}
    for name, (h_TD, y_TE) in data.items():
        k = int(y_TE.sum(1).max())
        pred = torch.zeros_like(y_TE).scatter_(1, gates[name].topk(h_TD, k), 1.0)
        out[name] = float((pred * y_TE).sum() / y_TE.sum().clamp_min(1))
    return out
