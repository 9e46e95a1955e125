"""The model config base: ``model: {kind: NAME, ...}`` selects a registered model class."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from moesaic.core.config import ComponentConfig
from moesaic.core.registry import Registry

MODELS: Registry[type[nn.Module]] = Registry("model", "moesaic.models", base="torch.nn:Module",
                                             default="moe_regression")


@dataclasses.dataclass
class ModelConfig(ComponentConfig):
    registry = MODELS
    #: What the model is trained for (the trainer's task, moesaic.train.task): "lm", "classification",
    #: "regression". Declared by each model config, never guessed from its fields.
    task: ClassVar[str] = "lm"
