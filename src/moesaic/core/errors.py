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


class OutputWriteError(MoesaicError, OSError):
    """Writing an output (a checkpoint, metrics) failed: disk full, read-only folder. Names the folder; what
    was published before stays intact."""


class DataError(MoesaicError, ValueError):
    """A data file is unusable: missing, empty, binary or not UTF-8, or it changed or vanished while being
    read. Names the config field and the file."""


class RankFailedError(MoesaicError, RuntimeError):
    """A rank of a distributed run failed, was killed or lost contact with the others (a collective broke
    or timed out). Names the rank."""


class NonFiniteTrainingError(MoesaicError, FloatingPointError):
    """A training step produced NaN or inf (loss, gradient or weight). Names the step and the first layer."""


class ConversionError(MoesaicError, ValueError):
    """A model cannot be converted (unsupported architecture, unused or missing tensors)."""


class RegistryError(MoesaicError, KeyError):
    """A registry lookup failed: an unknown name, or a ``module:Object`` path that does not import, names a
    missing attribute or an object of the wrong kind. ``rule`` says which (without the name)."""

    def __init__(self, name: str, rule: str, *, message: str = ""):
        self.name, self.rule = name, rule
        self.message = message or f"{name}: {rule}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return self.message


class PluginError(MoesaicError, ImportError):
    """A ``moesaic.plugins`` entry point failed to import."""
