"""Shared pieces of the shrinking verbs: per-expert statistics from calibration data and rebuilding an MoE
layer with fewer experts.

Expert statistics (Koishekenov et al. 2023, "Memory-efficient NLLB-200: Language-specific Expert Pruning of
a Massively Multilingual Machine Translation Model"; DeepSeek-MoE / DeepSpeed-MoE pruning by usage):

* ``usage``: how many (token, expert) assignments each expert received;
* ``saliency``: the sum over its assignments of ``router weight * ||expert output||``, i.e. how much the
  expert actually moved the layer's output.

Both are collected with the layer's routing hook (docs/design.md, "The data path") while a user-supplied
``calibrate(model)`` runs the model on data.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.activations import ACTIVATIONS
from moesaic.core.errors import ConversionError
from moesaic.core.types import DispatchPlan, RoutingDecision
from moesaic.moe.experts.stacked_ffn import FFNExperts
from moesaic.moe.layer import MoEConfig, MoELayer

FilterFn = Callable[[str, MoELayer], bool]


def expert_forward(experts: FFNExperts, e: int, x_ND: Tensor) -> Tensor:
    """Expert e of stacked FFN experts on rows ``x_ND`` (the readable reference of one expert)."""
    h_NH = x_ND @ experts.w_up_EHD[e].t()
    act = ACTIVATIONS[experts.cfg.activation]
    F = experts.d_ff
    a_NF = act(h_NH[:, :F]) * h_NH[:, F:] if experts.gated else act(h_NH)
    return a_NF @ experts.w_down_EDF[e].t()


def moe_layers(model: nn.Module, filter_fn: FilterFn | None, verb: str, need_router: bool = True
               ) -> list[tuple[str, MoELayer]]:
    """Every MoE layer accepted by ``filter_fn`` with stacked FFN experts and a weighted router; typed errors."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, MoELayer) and (filter_fn is None or filter_fn(n, m))]
    if not found:
        raise ConversionError(f"{verb}: no MoE layer found in {type(model).__name__}")
    for name, layer in found:
        if not isinstance(layer.experts, FFNExperts):
            raise ConversionError(f"{verb}: {name} has experts of kind {layer.cfg.experts.kind!r}, not stacked FFN "
                                  "experts (glu, mlp)")
        if not need_router:
            continue
        if not getattr(layer.router, "has_weight", False):
            raise ConversionError(f"{verb}: {name}'s router {layer.cfg.router.kind!r} has no per-expert weight rows")
        if getattr(layer.router.cfg, "n_groups", 1) > 1:
            raise ConversionError(f"{verb}: {name}'s router uses group-limited routing (n_groups > 1), which fixes "
                                  "the expert count")
    return found


@torch.no_grad()
def expert_stats(model: nn.Module, layers: list[tuple[str, MoELayer]],
                 calibrate: Callable[[nn.Module], object]) -> dict[str, dict[str, Tensor]]:
    """``{layer name: {"usage": [E], "saliency": [E]}}`` over everything ``calibrate(model)`` runs."""
    out = {n: {"usage": torch.zeros(lay.num_experts, dtype=torch.float64),
               "saliency": torch.zeros(lay.num_experts, dtype=torch.float64)} for n, lay in layers}
    inputs: dict[str, Tensor] = {}
    handles: list[Any] = []
    for name, layer in layers:
        def pre(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])

        def hook(lay: MoELayer, dec: RoutingDecision, plan: DispatchPlan, name: str = name) -> None:
            if plan.slots is not None:
                raise ConversionError(f"{name}: soft (slot) routing has no per-expert assignments to measure")
            x_ND = plan.gather(inputs[name])
            experts = lay.experts
            assert isinstance(experts, FFNExperts)
            start = 0
            for e, n in enumerate(plan.counts_E.tolist()):
                if n:
                    y_ND = expert_forward(experts, e, x_ND[start:start + n])
                    w_N = plan.weight_N[start:start + n]
                    out[name]["saliency"][e] += (w_N.double().abs() * y_ND.double().norm(dim=-1)).sum()
                    out[name]["usage"][e] += n
                start += n

        handles.append(layer.register_forward_pre_hook(pre))
        handles.append(layer.register_routing_hook(hook))
    try:
        was = model.training
        model.eval()
        calibrate(model)
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def rebuild_layer(layer: MoELayer, experts: list[dict[str, Tensor]], router_rows_ED: Tensor,
                  expert_bias_E: Tensor | None, top_k: int | None = None) -> MoELayer:
    """A new MoE layer of ``len(experts)`` experts (granularity 1, same widths) holding the given expert
    tensors and router rows; shared experts and the shared gate are copied. ``top_k`` defaults to the
    old routed k, capped at the new count."""
    E2 = len(experts)
    k = min(top_k or layer.top_k, E2)
    cfg: MoEConfig = dataclasses.replace(copy.deepcopy(layer.cfg), num_experts=E2, top_k=k, granularity=1,
                                         d_ff=layer.cfg.expert_d_ff)
    if cfg.shared_experts.num > 0 and cfg.shared_experts.d_ff is None:
        cfg.shared_experts = dataclasses.replace(cfg.shared_experts, d_ff=layer.cfg.expert_d_ff)
    p = next(layer.parameters())
    new = MoELayer(cfg, layer.d_model, causal=layer.router.causal).to(device=p.device, dtype=p.dtype)
    for e, state in enumerate(experts):
        new.experts.load_expert_state(e, state)
    new.router.weight.copy_(router_rows_ED)
    if expert_bias_E is not None and hasattr(new.router, "expert_bias"):
        new.router.expert_bias.copy_(expert_bias_E)
    if layer.shared_experts is not None and new.shared_experts is not None:
        new.shared_experts.load_state_dict(layer.shared_experts.state_dict())
    if layer.shared_gate is not None and new.shared_gate is not None:
        new.shared_gate.load_state_dict(layer.shared_gate.state_dict())
    new.layer_name = layer.layer_name
    new.train(layer.training)
    return new


def replace_layers(model: nn.Module, new: dict[str, MoELayer]) -> None:
    """Swap the layers in; when every MoE layer of the model was rebuilt the same way and the model config
    has a ``moe`` section, the config follows (so a saved checkpoint builds the new shape)."""
    for name, layer in new.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer)
    cfg = getattr(model, "cfg", None)
    remaining = [m for m in model.modules() if isinstance(m, MoELayer)]
    cfgs = {repr(m.cfg) for m in remaining}
    if cfg is not None and getattr(cfg, "moe", None) is not None and len(cfgs) == 1:
        cfg.moe = copy.deepcopy(remaining[0].cfg)


def expert_bias(layer: MoELayer) -> Tensor | None:
    b = getattr(layer.router, "expert_bias", None)
    return b if isinstance(b, Tensor) else None
