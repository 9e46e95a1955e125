"""``model.module_swaps``: modules of a built model replaced by other components, as a converted checkpoint
needs them.

A conversion verb (``moesaic convert VERB``, docs/convert.md) may turn a dense FFN into an MoE layer or a
MoEfied FFN (Zhang et al. 2022, "MoEfication"), an MoE layer into one with fewer experts or into one dense
FFN, in models whose config has no field for that layer (a BERT encoder, a Transformer whose layers differ).
The checkpoint then stores, next to the source model config, which module paths hold which component;
:meth:`moesaic.models.base.ModelConfig.build` builds the model, then swaps each listed module for a fresh
component of that structure (weights are loaded afterwards by name). Nothing in the model classes knows
about swaps: this is a transform applied at build time, like ``peft``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from moesaic.core.activations import Activation
from moesaic.core.config import ConfigError, Section, require, rule
from moesaic.moe.api import name_layers
from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.layer import MoEConfig, MoELayer
from moesaic.moe.moefied import MoEfiedConfig, MoEfiedFFN


@dataclasses.dataclass
class DenseFFNConfig(Section):
    """The structure of a :class:`~moesaic.moe.dense_ffn.DenseFFN`."""

    d_ff: int = rule(1, ge=1)
    activation: Activation = "silu"
    gated: bool = True
    bias: bool = False


@dataclasses.dataclass
class ModuleSwap(Section):
    """The modules at ``modules`` (dotted paths) become one of ``moe`` / ``moefied`` / ``dense`` (exactly one
    is set) of width ``d_model``; ``causal`` is the MoE router's causality."""

    modules: list[str] = dataclasses.field(default_factory=list)
    d_model: int = rule(1, ge=1)
    causal: bool = False
    moe: MoEConfig | None = None
    moefied: MoEfiedConfig | None = None
    dense: DenseFFNConfig | None = None

    def validate(self, path: str) -> None:
        kinds = [k for k in ("moe", "moefied", "dense") if getattr(self, k) is not None]
        require(len(kinds) == 1, f"{path}.moe", kinds, "exactly one of moe, moefied, dense must be set")
        require(bool(self.modules), f"{path}.modules", self.modules, "must name at least one module path")

    def build(self) -> nn.Module:
        """A fresh component of this structure (weights to be loaded)."""
        if self.moe is not None:
            return self.moe.build(self.d_model, causal=self.causal)
        if self.moefied is not None:
            return MoEfiedFFN.from_config(self.moefied, self.d_model)
        d = self.dense
        assert d is not None
        return DenseFFN(self.d_model, d.d_ff, d.activation, d.gated, d.bias)


def describe(module: nn.Module) -> ModuleSwap | None:
    """The swap that rebuilds ``module`` (no paths yet), or None for a module that swaps do not cover."""
    if isinstance(module, MoELayer):
        return ModuleSwap(d_model=module.d_model, causal=bool(getattr(module.router, "causal", False)),
                          moe=module.cfg)
    if isinstance(module, MoEfiedFFN):
        return ModuleSwap(d_model=module.d_model, moefied=module.config())
    if isinstance(module, DenseFFN):
        return ModuleSwap(d_model=module.d_model, dense=DenseFFNConfig(
            d_ff=module.d_ff, activation=module.activation, gated=module.gated,  # type: ignore[arg-type]
            bias=module.bias))
    return None


def apply_module_swaps(model: Any, swaps: list[ModuleSwap]) -> Any:
    """``model`` with every listed module replaced by a fresh component (in place); MoE layers renamed."""
    if not swaps:
        return model
    dtype_of = next(iter(model.parameters()), None)
    for swap in swaps:
        for path in swap.modules:
            parent, _, attr = path.rpartition(".")
            try:
                owner = model.get_submodule(parent) if parent else model
                getattr(owner, attr)
            except AttributeError:
                raise ConfigError("model.module_swaps.modules", path, "no such module in the built model") from None
            new = swap.build()
            if dtype_of is not None:
                new = new.to(device=dtype_of.device, dtype=dtype_of.dtype)
            setattr(owner, attr, new)
    name_layers(model)
    return model
