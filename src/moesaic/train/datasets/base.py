"""The dataset interface: ``data: {kind: NAME, ...}`` selects a registered :class:`Dataset` subclass."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from moesaic.core.config import ComponentConfig
from moesaic.core.registry import Registry

DATASETS: Registry[type[Dataset]] = Registry(
    "dataset", "moesaic.train.datasets", base="moesaic.train.datasets.base:Dataset", default="toy_regression")


@dataclasses.dataclass
class DataConfig(ComponentConfig):
    registry = DATASETS


class Dataset:
    """Base of every registered dataset: built from its Config (``data.build()``); what it serves is up to
    the task (regression pairs, token windows, labelled sequences)."""

    Config: ClassVar[type[DataConfig]] = DataConfig

    def __init__(self, cfg: DataConfig, **kw: Any) -> None:
        self.cfg = cfg
