"""The model config base: ``model: {kind: NAME, ...}`` selects a registered model class."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import nn

from moesaic.core.config import ComponentConfig
from moesaic.core.registry import Registry
from moesaic.models.adapters import AdapterConfig, apply_adapter
from moesaic.models.module_swaps import ModuleSwap, apply_module_swaps

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
    #: Modules replaced after building, as a converted checkpoint needs them (``moesaic convert``;
    #: :mod:`moesaic.models.module_swaps`, docs/convert.md). Empty for every model that was not converted.
    module_swaps: list[ModuleSwap] = dataclasses.field(default_factory=list)

    def build(self, *args: Any, **kwargs: Any) -> Any:
        """The registered model of ``kind`` with ``module_swaps`` applied, then ``peft`` injected when set."""
        return apply_adapter(apply_module_swaps(super().build(*args, **kwargs), self.module_swaps), self.peft)
