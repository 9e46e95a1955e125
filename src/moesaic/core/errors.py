"""Typed errors. Every error a user can trigger names the field or layer and the rule it broke."""

from __future__ import annotations


class MoesaicError(Exception):
    """Base class of every error moesaic raises on purpose."""


class ConfigError(MoesaicError, ValueError):
    """A configuration value breaks a rule. ``str(err)`` is ``path = value: rule``."""

    def __init__(self, path: str, value: object = None, rule: str = "", *, show_value: bool = True):
        self.path, self.value, self.rule = path, value, rule
        msg = f"{path} = {value!r}: {rule}" if show_value else f"{path}: {rule}"
        super().__init__(msg)


class NonFiniteInputError(MoesaicError, FloatingPointError):
    """NaN or inf reached a router. Names the layer (and the step when known)."""


class CausalityError(MoesaicError, ValueError):
    """A router that looks at the whole group (expert choice, Soft MoE) was used causally."""


class RoutingInputError(MoesaicError, ValueError):
    """A router lacks routing context it needs (``token_ids``, ``task_id``, ...) or got a bad value."""


class CheckpointError(MoesaicError):
    """Base class of checkpoint errors."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is missing, truncated or does not match its manifest hash."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the model or config it is loaded into."""


class ConversionError(MoesaicError, ValueError):
    """A model cannot be converted (unsupported architecture, unused or missing tensors)."""
