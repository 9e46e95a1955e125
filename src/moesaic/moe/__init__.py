"""Layers: the MoE layer (pure composition), dense FFNs and shared experts."""

from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.layer import MoEConfig, MoELayer, SharedExpertsConfig

__all__ = ["DenseFFN", "MoEConfig", "MoELayer", "SharedExpertsConfig"]
