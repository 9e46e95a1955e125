"""Models built from blocks and configs, registered in :data:`moesaic.models.base.MODELS`."""

from moesaic.models.base import ModelConfig

__all__ = ["ModelConfig"]
