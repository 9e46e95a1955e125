"""Schedules driven by the global training step: k (SMoE-Dropout), temperature (EvoMoE), capacity, ...

A schedule is a typed config with a ``kind`` and a pure ``value(step) -> float``; ``cfg.build()`` gives a
:class:`Schedule` module that holds the current step in a persistent ``step`` buffer, so
``model.state_dict()`` saves it and a resumed run continues from the exact same value. The step is set
by ``on_optimizer_step(step)``, which :func:`moesaic.on_optimizer_step` calls on every module once per
optimizer step with the new global step (0 before the first step).

Formulas of the SMoE-Dropout ``calculate_gate_number`` modes (Chen et al. 2023, "Sparse MoE as the New
Dropout: Scaling Dense and Self-Slimmable Transformers"; code: VITA-Group/Random-MoE-as-Dropout
``new_utils.py``), with ``lo = min_value``, ``hi = max_value``, ``S = total_steps`` and
``s = min(step, S)``; ``rnd`` is Python's ``round`` (half to even, as in the original) when
``integer: true`` and the identity otherwise; every result is clipped to ``[lo, hi]``:

* ``linear_increase``: ``rnd((hi - lo) * s / S) + lo``
* ``linear_decrease``: ``rnd((lo - hi) * s / S) + hi``
* ``cosine_increase``: ``rnd((lo - hi) * cos(pi s / 2S)) + hi``
* ``cosine_decrease``: ``rnd((hi - lo) * cos(pi s / 2S)) + lo``
* ``exp_increase``: ``rnd((lo - hi) * base ** (s // (S // intervals))) + hi`` (base 0.99, 300 intervals)
* ``multi_step_increase``/``multi_step_decrease``: ``values[int(len(values) * s / S)]``

The step is clamped to ``S``, unlike the original, so that every mode stays at its end value after the
ramp: the original's cosine would turn back after ``2S`` and its multi-step index overflows at ``s = S``; at
``s = S`` the multi-step modes take the last value. ``exp_increase`` is the exception: it is monotone
for every step, and like the original it is not at ``hi`` at ``s = S`` in general (``0.99^300 = 0.049``,
so ``lo = 2, hi = 16`` gives 15 at ``S``); it keeps approaching ``hi`` after ``S``, as the original does.

EvoMoE temperature (Nie et al. 2021, arXiv 2112.14397; code: codecaution/EvoMoE
``fairseq/modules/moe/topkgate.py``), with ``D = decay_steps``:

* ``exp_decay``: ``max(hi * exp(step * ln(lo / hi) / D), lo)``
* linear decay is ``linear_decrease`` with ``integer: false`` and ``total_steps: D``:
  ``max(hi - step * (hi - lo) / D, lo)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from moesaic.core.config import ComponentConfig, require, rule
from moesaic.core.registry import SCHEDULES


@dataclasses.dataclass
class ScheduleConfig(ComponentConfig):
    """Base of every schedule config. ``value(step)`` is pure; ``build()`` gives the stateful module."""

    registry = SCHEDULES

    def value(self, step: int) -> float:
        raise NotImplementedError  # abstract: every registered schedule implements it


class Schedule(nn.Module):
    """A schedule bound to the training step. ``value()`` is the value at the current step."""

    Config: ClassVar[type[ScheduleConfig]] = ScheduleConfig
    step: Tensor

    def __init__(self, cfg: ScheduleConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=True)
        # Python mirror of the buffer (no device sync per forward), keyed by the buffer's storage and
        # version counter so any in-place load (load_state_dict, checkpoint copy_) or move invalidates it.
        self._mirror: tuple[tuple[int, int], int] | None = None

    def _key(self) -> tuple[int, int]:
        return self.step.data_ptr(), self.step._version

    def on_optimizer_step(self, step: int) -> None:
        self.step.fill_(int(step))
        self._mirror = (self._key(), int(step))

    @property
    def current_step(self) -> int:
        if self._mirror is None or self._mirror[0] != self._key():
            self._mirror = (self._key(), int(self.step.item()))
        return self._mirror[1]

    def value(self, step: int | None = None) -> float:
        return self.cfg.value(self.current_step if step is None else step)

    def extra_repr(self) -> str:
        return f"kind={self.cfg.kind}, step={self.current_step}"


def _register(name: str, cfg_cls: type[ScheduleConfig]) -> type[ScheduleConfig]:
    """Register ``cfg_cls`` under ``name``: the registry entry is a :class:`Schedule` with that Config."""
    cls = type(f"{cfg_cls.__name__.removesuffix('ScheduleConfig')}Schedule", (Schedule,),
               {"Config": cfg_cls, "__doc__": cfg_cls.__doc__, "__module__": __name__})
    SCHEDULES.register(name)(cls)
    return cfg_cls


@dataclasses.dataclass
class ConstantScheduleConfig(ScheduleConfig):
    """The same value at every step."""

    constant: float = 1.0

    def value(self, step: int) -> float:
        return self.constant


_register("constant", ConstantScheduleConfig)


@dataclasses.dataclass
class RampScheduleConfig(ScheduleConfig):
    """Moves between ``min_value`` and ``max_value`` over ``total_steps`` (the SMoE-Dropout k schedules)."""

    min_value: float = 1.0
    max_value: float = 2.0
    total_steps: int = rule(1000, ge=1)
    integer: bool = False

    def validate(self, path: str) -> None:
        require(self.min_value <= self.max_value, f"{path}.min_value", self.min_value,
                f"must be <= max_value ({self.max_value})")

    def _round(self, v: float) -> float:
        return float(round(v)) if self.integer else v

    def _clip(self, v: float) -> float:
        return min(max(v, self.min_value), self.max_value)

    def _frac(self, step: int) -> float:
        return min(max(step, 0), self.total_steps) / self.total_steps

    def value(self, step: int) -> float:
        lo, hi, f = self.min_value, self.max_value, self._frac(step)
        kind = self.kind
        if kind in ("linear_increase", "linear_decrease") and not self.integer:
            a, b = (lo, hi) if kind == "linear_increase" else (hi, lo)
            v = a * (1.0 - f) + b * f  # lerp: exact end points in floating point
        elif kind == "linear_increase":
            v = self._round((hi - lo) * f) + lo
        elif kind == "linear_decrease":
            v = self._round((lo - hi) * f) + hi
        elif kind == "cosine_increase":
            v = self._round((lo - hi) * math.cos(math.pi * f / 2)) + hi
        elif kind == "cosine_decrease":
            v = self._round((hi - lo) * math.cos(math.pi * f / 2)) + lo
        else:
            raise ValueError(f"schedule kind {kind!r} is not a ramp")
        return self._clip(v)


for _name in ("linear_increase", "linear_decrease", "cosine_increase", "cosine_decrease"):
    # One Config class per name: the registration makes the name its default kind.
    _register(_name, dataclasses.make_dataclass(
        "".join(p.title() for p in _name.split("_")) + "ScheduleConfig", [],
        bases=(RampScheduleConfig,), namespace={"__doc__": (RampScheduleConfig.__doc__ or "").replace(
            "Moves", _name.replace("_", " ").capitalize() + ":", 1), "__module__": __name__}))


@dataclasses.dataclass
class ExpIncreaseScheduleConfig(RampScheduleConfig):
    """Exponential approach from min_value to max_value: ``hi + (lo - hi) * base^(s // (S // intervals))``."""

    base: float = rule(0.99, gt=0.0, lt=1.0)
    intervals: int = rule(300, ge=1)

    def validate(self, path: str) -> None:
        super().validate(path)
        require(self.total_steps >= self.intervals, f"{path}.total_steps", self.total_steps,
                f"must be >= intervals ({self.intervals})")

    def value(self, step: int) -> float:
        n = max(step, 0) // (self.total_steps // self.intervals)  # not clamped: monotone without it
        return self._clip(self._round((self.min_value - self.max_value) * self.base ** n) + self.max_value)


_register("exp_increase", ExpIncreaseScheduleConfig)


@dataclasses.dataclass
class MultiStepScheduleConfig(ScheduleConfig):
    """Piecewise constant: ``values[int(len(values) * s / S)]`` clipped to [min_value, max_value]."""

    values: list[float] = dataclasses.field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0])
    total_steps: int = rule(1000, ge=1)
    min_value: float = rule(-math.inf, finite=False)
    max_value: float = rule(math.inf, finite=False)

    def validate(self, path: str) -> None:
        require(len(self.values) >= 1, f"{path}.values", self.values, "must hold at least one value")
        ordered = sorted(self.values, reverse=self.kind == "multi_step_decrease")
        require(list(self.values) == ordered, f"{path}.values", self.values,
                "must be non-decreasing" if self.kind == "multi_step_increase" else "must be non-increasing")
        require(self.min_value <= self.max_value, f"{path}.min_value", self.min_value,
                f"must be <= max_value ({self.max_value})")

    def value(self, step: int) -> float:
        s = min(max(step, 0), self.total_steps)
        i = min(int(len(self.values) * s / self.total_steps), len(self.values) - 1)
        return min(max(self.values[i], self.min_value), self.max_value)


_register("multi_step_increase", MultiStepScheduleConfig)


@dataclasses.dataclass
class MultiStepDecreaseScheduleConfig(MultiStepScheduleConfig):
    """Piecewise constant, decreasing: ``values[int(len(values) * s / S)]``, default [16, 8, 4, 2, 1]."""

    values: list[float] = dataclasses.field(default_factory=lambda: [16.0, 8.0, 4.0, 2.0, 1.0])


_register("multi_step_decrease", MultiStepDecreaseScheduleConfig)


@dataclasses.dataclass
class ExpDecayScheduleConfig(ScheduleConfig):
    """EvoMoE temperature: ``max(max_value * exp(step * ln(min_value / max_value) / decay_steps), min_value)``."""

    max_value: float = rule(2.0, gt=0.0)
    min_value: float = rule(0.3, gt=0.0)
    decay_steps: int = rule(1000, ge=1)

    def validate(self, path: str) -> None:
        require(self.min_value <= self.max_value, f"{path}.min_value", self.min_value,
                f"must be <= max_value ({self.max_value})")

    def value(self, step: int) -> float:
        rate = math.log(self.min_value / self.max_value) / self.decay_steps
        return max(self.max_value * math.exp(max(step, 0) * rate), self.min_value)


_register("exp_decay", ExpDecayScheduleConfig)


def schedule(kind: str, **fields: Any) -> Schedule:
    """Build a schedule module from keyword fields, validated like YAML: ``schedule("linear_increase",
    min_value=2, max_value=16, total_steps=1000, integer=True)``."""
    from moesaic.core.config import parse, validate_tree

    sched: Schedule = validate_tree(parse(ScheduleConfig, {"kind": kind, **fields}, "schedule"), "schedule").build()
    return sched
