"""Models built from blocks and configs, registered in :data:`moesaic.core.registry.MODELS`."""

from moesaic.models.base import ModelConfig

__all__ = ["ModelConfig"]
