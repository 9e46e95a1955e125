"""The adapter slot of a model config: ``model.peft: {kind: NAME, ...}`` (parameter-efficient fine-tuning).

:data:`ADAPTERS` holds transforms that wrap or re-parametrize parts of a built model in place (LoRA experts,
``moesaic.peft``). They live in ``moesaic.peft`` and register here, like any plugin, so a model config can name
one and :meth:`moesaic.models.base.ModelConfig.build` applies it right after building the model; nothing in the
model classes knows about adapters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from moesaic.core.config import ComponentConfig
from moesaic.core.registry import Registry


class Adapter:
    """Base of adapter entries: ``Adapter(cfg)(model)`` injects in place and returns the model."""

    def __init__(self, cfg: AdapterConfig) -> None:
        self.cfg = cfg

    def __call__(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError  # abstract: every registered adapter implements it


ADAPTERS: Registry[type[Adapter]] = Registry(
    "adapter", "moesaic.peft", base="moesaic.models.adapters:Adapter", default="lora_experts")


@dataclasses.dataclass
class AdapterConfig(ComponentConfig):
    """Fields every adapter has (none yet); an entry's own Config adds its fields."""

    registry = ADAPTERS


def apply_adapter(model: nn.Module, cfg: AdapterConfig | None) -> Any:
    """``model`` with the adapter of ``cfg`` injected (unchanged when ``cfg`` is None)."""
    return model if cfg is None else cfg.build()(model)
