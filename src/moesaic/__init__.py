"""moesaic: Mixture-of-Experts Transformers in PyTorch.

Public names (stable; the public surface of docs/design.md): :class:`MoELayer`, :class:`RoutingDecision`,
:func:`collect_aux_losses`, :func:`moe_layer`, :func:`load`, and the subpackages ``interop.hf``
(``from_hf``/``to_hf``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moesaic.core.allocator import tune_malloc
from moesaic.core.errors import (
    CausalityError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    MoesaicError,
    NonFiniteInputError,
)
from moesaic.core.types import RoutingDecision
from moesaic.inference.generate import Completion, complete, generate
from moesaic.interop import load as _load  # noqa: F401  (registers the HF folder loader for distillation)
from moesaic.interop.embed import embed
from moesaic.moe.api import collect_aux_losses, moe_layer, moe_layers, name_layers, on_optimizer_step
from moesaic.moe.layer import MoEConfig, MoELayer

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

__version__ = "0.1.0"

# reuse freed memory instead of page-faulting it in again (core/allocator.py); MOESAIC_MALLOC=default: off
tune_malloc()


def load(checkpoint_dir: str | Path, **kwargs: Any) -> nn.Module:
    """Load a model from a checkpoint directory (``config.yaml`` + ``model.safetensors``), or from a Hugging
    Face folder (``config.json``: imported with ``from_hf``); ``model.tokenizer`` is set when there is one."""
    from moesaic.interop.load import load_any

    return load_any(checkpoint_dir, **kwargs)


__all__ = [
    "MoELayer", "MoEConfig", "RoutingDecision", "collect_aux_losses", "moe_layer", "moe_layers", "name_layers",
    "on_optimizer_step", "load", "embed", "generate", "complete", "Completion",
    "ConfigError", "MoesaicError", "NonFiniteInputError", "CausalityError",
    "CheckpointError", "CheckpointCorruptError", "CheckpointMismatchError", "__version__",
]
