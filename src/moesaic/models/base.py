"""The model config base: ``model: {kind: NAME, ...}`` selects a registered model class."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import nn

from moesaic.core.config import ComponentConfig
from moesaic.core.registry import Registry
from moesaic.models.adapters import AdapterConfig, apply_adapter

MODELS: Registry[type[nn.Module]] = Registry("model", "moesaic.models", base="torch.nn:Module",
                                             default="moe_regression")


@dataclasses.dataclass
class ModelConfig(ComponentConfig):
    registry = MODELS
    #: What the model is trained for (the trainer's task, moesaic.train.task): "lm", "classification",
    #: "regression". Declared by each model config, never guessed from its fields.
    task: ClassVar[str] = "lm"
    #: Parameter-efficient fine-tuning applied right after building (``moesaic.peft``, docs/peft.md):
    #: e.g. ``peft: {kind: lora_experts, target_modules: [q_proj, v_proj], num_experts: 4, top_k: 1}``.
    peft: AdapterConfig | None = None

    def build(self, *args: Any, **kwargs: Any) -> Any:
        """The registered model of ``kind``, with ``peft`` injected when set."""
        return apply_adapter(super().build(*args, **kwargs), self.peft)
