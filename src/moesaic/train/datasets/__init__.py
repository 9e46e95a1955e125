"""Datasets by name (``data: {kind: NAME, ...}``), registered in :data:`moesaic.train.datasets.base.DATASETS`."""

from moesaic.train.datasets.base import DataConfig

__all__ = ["DataConfig"]
