"""The top-level config of a run: ``model``, ``data``, ``train``, ``parallel`` sections."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moesaic.core.config import Section, apply_overrides, load_yaml, parse, validate_tree
from moesaic.distributed.config import ParallelConfig
from moesaic.models.base import ModelConfig
from moesaic.train.config import TrainConfig
from moesaic.train.datasets.base import DataConfig


@dataclasses.dataclass
class RunConfig(Section):
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig.for_kind)
    data: DataConfig = dataclasses.field(default_factory=DataConfig.for_kind)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)


def load_run_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                    data: dict[str, Any] | None = None) -> RunConfig:
    """Load YAML (or plain ``data``), apply ``--set`` overrides, parse strictly and validate."""
    raw = load_yaml(path) if path is not None else dict(data or {})
    raw = apply_overrides(raw, list(overrides))
    return validate_tree(parse(RunConfig, raw, ""), "")
