"""The data config base: ``data: {kind: NAME, ...}`` selects a registered dataset."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from moesaic.core.config import ComponentConfig
from moesaic.core.registry import DATASETS


@dataclasses.dataclass
class DataConfig(ComponentConfig):
    registry: ClassVar = DATASETS
    kind: str = "toy_regression"
