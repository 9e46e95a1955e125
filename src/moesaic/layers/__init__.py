"""Layers: the MoE layer (pure composition), dense FFNs and shared experts."""

from moesaic.layers.ffn import DenseFFN
from moesaic.layers.moe import MoEConfig, MoELayer, SharedExpertsConfig

__all__ = ["DenseFFN", "MoEConfig", "MoELayer", "SharedExpertsConfig"]
