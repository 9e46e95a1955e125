"""Make a converted model's ``cfg`` describe its structure, so the saved checkpoint rebuilds it.

After a verb (docs/convert.md) some modules may differ from what ``model.cfg`` builds: a BERT FFN upcycled
or MoEfied, a Transformer layer pruned differently from the others, an MoE layer densified. They are
recorded as ``model.cfg.module_swaps`` (:mod:`moesaic.models.module_swaps`): every module that
:func:`~moesaic.models.module_swaps.describe` covers and that differs from the freshly built source
structure. The result is checked by building ``model.cfg`` on the meta device (no memory) and comparing
every parameter and buffer name and shape; a model the config cannot describe is a
:class:`~moesaic.core.errors.ConversionError`, raised before anything is written.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from moesaic.core.config import to_dict
from moesaic.core.errors import ConversionError
from moesaic.models.module_swaps import ModuleSwap, describe


def _key(swap: ModuleSwap) -> str:
    return repr(to_dict(dataclasses.replace(swap, modules=[])))


def _meta_build(cfg: Any) -> nn.Module:
    with torch.device("meta"):
        model: nn.Module = cfg.build()
    return model


def structure_swaps(model: nn.Module) -> list[ModuleSwap]:
    """The swaps that turn what ``model.cfg`` builds (without swaps or adapters) into ``model``."""
    base_cfg: Any = copy.deepcopy(model.cfg)
    base_cfg.module_swaps, base_cfg.peft = [], None
    ref = dict(_meta_build(base_cfg).named_modules())
    groups: dict[str, ModuleSwap] = {}
    swapped: list[str] = []
    for path, m in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in swapped):
            continue
        want = describe(m)
        if want is None:
            continue
        have = describe(ref[path]) if path in ref else None
        if have is not None and _key(have) == _key(want):
            continue
        groups.setdefault(_key(want), dataclasses.replace(want, modules=[])).modules.append(path)
        swapped.append(path)
    return list(groups.values())


def sync_structure_(model: nn.Module) -> nn.Module:
    """Set ``model.cfg.module_swaps`` from the model's modules and check that ``model.cfg`` builds exactly
    this model's parameter names and shapes; returns ``model``."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "module_swaps"):
        raise ConversionError(f"{type(model).__name__}: no model config to save the converted model with")
    cfg.module_swaps = structure_swaps(model)
    built = {n: tuple(t.shape) for n, t in _meta_build(cfg).state_dict().items()}
    have = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if built != have:
        diff = sorted(n for n in built.keys() | have.keys() if built.get(n) != have.get(n))
        raise ConversionError(f"the converted {type(model).__name__} cannot be rebuilt from its config "
                              f"({len(diff)} tensors differ, e.g. {diff[0]}: config {built.get(diff[0])} vs model "
                              f"{have.get(diff[0])})")
    return model
