"""Expert collections with stacked per-expert weights and named compute backends."""

from moesaic.moe.experts.base import Experts, ExpertsConfig

__all__ = ["Experts", "ExpertsConfig"]
