"""``inject_lora_experts_(model, cfg)``: LoRA experts on the targeted layers of any torch model (moesaic or
Hugging Face transformers), the rest frozen; ``merge_`` / ``unmerge_``; the ``lora_experts`` adapter entry.

Targets follow PEFT's rule: a target matches a module (or a parameter, for 3-D stacked expert weights) whose
name equals it or ends with ``"." + target``. A matched ``nn.Linear`` is wrapped in :class:`LoRAExpertsLinear`,
a matched 3-D parameter gets a :class:`StackedLoRA`; anything else, or a target that matches nothing, is a
:class:`~moesaic.core.errors.ConfigError` naming ``peft.target_modules``. The layer of a match is the first
integer in its name (``model.layers.7.self_attn.q_proj`` -> 7); per-layer expert counts (lists or MoLA
allocations, :mod:`moesaic.peft.allocation`) are indexed by the targeted layers in order.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

from moesaic.core.config import ConfigError, require, validate_tree
from moesaic.peft.allocation import allocate, per_layer
from moesaic.peft.config import LoRAExpertsConfig
from moesaic.peft.lora_linear import LoRAExpertsLinear, PeftMergeError
from moesaic.peft.lora_stacked import StackedLoRA, add_stacked_lora_, merge_stacked_, unmerge_stacked_

__all__ = ["inject_lora_experts_", "merge_", "unmerge_", "lora_modules", "trainable_parameters", "PeftMergeError"]


@dataclasses.dataclass
class Target:
    name: str          # module name, or module name + "." + parameter for stacked weights
    module: nn.Module
    param: str | None  # set for 3-D stacked expert weights
    layer: int


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _layer_of(name: str) -> int:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else 0


def find_targets(model: nn.Module, targets: list[str], path: str = "peft.target_modules") -> list[Target]:
    """Every module / 3-D parameter matched by ``targets``; typed errors for no match or a wrong kind."""
    modules = dict(model.named_modules())
    found: dict[str, Target] = {}
    wrapped = [n for n, m in modules.items() if isinstance(m, LoRAExpertsLinear)]
    for t in targets:
        hits = 0
        for name, mod in modules.items():
            if isinstance(mod, StackedLoRA) or any(name.startswith(w + ".") for w in wrapped):
                continue
            if _matches(name, t):
                if not isinstance(mod, nn.Linear):
                    raise ConfigError(path, t, f"matches {name!r}, a {type(mod).__name__}: targets must be nn.Linear "
                                               "layers or 3-D stacked expert weights")
                found[name] = Target(name, mod, None, _layer_of(name))
                hits += 1
            for pname, p in list(mod.named_parameters(recurse=False)):
                full = f"{name}.{pname}" if name else pname
                if _matches(full, t) and not isinstance(mod, nn.Linear):
                    if p.dim() != 3:
                        raise ConfigError(path, t, f"matches parameter {full!r} of shape {tuple(p.shape)}: only "
                                                   "3-D expert weights [E, out, in] are targets besides nn.Linear")
                    found[full] = Target(full, mod, pname, _layer_of(full))
                    hits += 1
        if hits == 0:
            raise ConfigError(path, t, "matches no nn.Linear module or 3-D expert weight of the model "
                                       "(a name or a suffix after a dot, e.g. q_proj)")
    return sorted(found.values(), key=lambda x: (x.layer, x.name))


def layer_plan(cfg: LoRAExpertsConfig, depth: int, path: str = "peft") -> tuple[list[int], list[int]]:
    """Expert counts and k per targeted layer."""
    top_k = per_layer(cfg.top_k, depth, f"{path}.top_k")
    if cfg.allocation is not None:
        assert isinstance(cfg.num_experts, int)
        experts = allocate(cfg.allocation, cfg.num_experts, depth, max(top_k), f"{path}.allocation")
    else:
        experts = per_layer(cfg.num_experts, depth, f"{path}.num_experts")
    for i, (e, k) in enumerate(zip(experts, top_k)):
        require(1 <= k <= e, f"{path}.top_k", cfg.top_k, f"layer {i}: must be in [1, num_experts] = [1, {e}]")
    return experts, top_k


def _set_child(model: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, child)


def inject_lora_experts_(model: nn.Module, cfg: LoRAExpertsConfig | None = None,
                         target_modules: list[str] | None = None, **overrides: Any) -> nn.Module:
    """Freeze ``model`` and add LoRA experts to every target (in place; returns ``model``).

    ``cfg`` defaults to :class:`LoRAExpertsConfig` (``overrides`` replace its fields, ``target_modules`` too).
    Afterwards only the adapters, their routers and ``cfg.modules_to_save`` require gradients. Returns the model.
    """
    cfg = cfg if cfg is not None else LoRAExpertsConfig()
    if target_modules is not None:
        overrides["target_modules"] = list(target_modules)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    validate_tree(cfg, "peft")
    targets = find_targets(model, cfg.target_modules)
    layers = sorted({t.layer for t in targets})
    experts, top_k = layer_plan(cfg, len(layers))
    for p in model.parameters():
        p.requires_grad_(False)
    for t in targets:
        i = layers.index(t.layer)
        if t.param is None:
            assert isinstance(t.module, nn.Linear)
            wrapped = LoRAExpertsLinear(t.module, cfg.rank, cfg.alpha, cfg.dropout, experts[i], top_k[i], cfg.router,
                                        cfg.shared, t.name)
            _set_child(model, t.name, wrapped)
        else:
            add_stacked_lora_(t.module, t.param, cfg.rank, cfg.alpha, t.name)
    for keep in cfg.modules_to_save:
        hits = [m for n, m in model.named_modules() if _matches(n, keep)]
        require(bool(hits), "peft.modules_to_save", keep, "matches no module of the model")
        for m in hits:
            m.requires_grad_(True)
    model.peft_config = cfg  # type: ignore[assignment]  # what save_lora_experts writes beside the weights
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRAExpertsLinear | StackedLoRA]:
    """Every adapter of ``model`` by the name of what it adapts."""
    out: dict[str, LoRAExpertsLinear | StackedLoRA] = {}
    for m in model.modules():
        if isinstance(m, (LoRAExpertsLinear, StackedLoRA)):
            out[m.name] = m
    return out


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that require gradients (adapters, routers, modules_to_save)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _stacked_owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, param = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), param


def merge_(model: nn.Module, expert: int | None = None) -> nn.Module:
    """Fold the adapters into the base weights (exact: plain LoRA, stacked LoRA, or ``expert`` fixed per task).

    Routed LoRA experts without ``expert`` raise :class:`PeftMergeError` naming the layer, before any change."""
    mods = lora_modules(model)
    for m in mods.values():  # check every layer first: a failed merge changes nothing
        if isinstance(m, LoRAExpertsLinear):
            m.delta_weight(expert if m.num_experts > 1 else None)
    for name, m in mods.items():
        if isinstance(m, LoRAExpertsLinear):
            m.merge_(expert if m.num_experts > 1 else None)
        else:
            merge_stacked_(*_stacked_owner(model, name), m)
    return model


def unmerge_(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_` (the base weights come back up to rounding)."""
    for name, m in lora_modules(model).items():
        if isinstance(m, LoRAExpertsLinear):
            m.unmerge_()
        else:
            unmerge_stacked_(*_stacked_owner(model, name), m)
    return model
