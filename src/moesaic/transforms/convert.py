"""The conversion verbs behind ``moesaic convert VERB IN... OUT [--set key=value ...]`` (docs/convert.md).

A verb is a Python function ``verb_(model, cfg, filter_fn=None, *, extra=()) -> nn.Module`` with a typed
config (a :class:`~moesaic.core.config.Section` dataclass), registered once in :data:`CONVERTERS`::

    @dataclasses.dataclass
    class UpcycleConfig(Section):
        num_experts: int = rule(8, ge=1)

    @converter("upcycle", UpcycleConfig, inputs=(1, None))
    def upcycle_(model, cfg, filter_fn=None, *, extra=()):
        '''Sparse upcycling (Komatsuzaki et al. 2023): dense FFNs -> MoE layers of copies.'''
        ...
        return model

* ``model`` is the first input (a built moesaic model; Hugging Face folders arrive through ``from_hf``);
  ``extra`` are the further inputs of verbs that take several (``inputs=(min, max)``, ``None`` = any).
* The verb changes ``model`` in place where it can and returns the converted model. The returned model's
  ``cfg`` must describe its structure: the checkpoint stores ``to_dict(model.cfg)`` and loading rebuilds the
  model from it (``MODELS``), then loads the weights by name.
* ``filter_fn(name, module)`` picks the FFN / MoE modules to touch by module path (None = all).
* A verb that cannot do what it is asked raises a typed error (:class:`ConversionError` naming the layer
  and the reason, :class:`ConfigError` for a bad setting) before anything is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from torch import nn

from moesaic.core.config import Section, apply_overrides, parse, validate_tree
from moesaic.core.errors import ConfigError
from moesaic.core.registry import Registry

#: ``filter_fn(module_path, module) -> bool``: which FFN or MoE modules a verb converts (None = all).
FilterFn = Callable[[str, nn.Module], bool]


class VerbFn(Protocol):
    def __call__(self, model: nn.Module, cfg: Any, filter_fn: FilterFn | None = None, *,
                 extra: Sequence[nn.Module] = ()) -> nn.Module: ...


@dataclasses.dataclass(frozen=True)
class Converter:
    """A registered verb: its function, its config class and how many inputs it takes."""

    name: str
    fn: VerbFn
    config: type[Section]
    min_inputs: int = 1
    max_inputs: int | None = 1
    doc: str = ""

    def parse_config(self, overrides: Sequence[str] = ()) -> Section:
        """The verb's config from ``--set key=value`` overrides (strict: unknown keys, bad types raise)."""
        raw = apply_overrides({}, list(overrides))
        cfg: Section = validate_tree(parse(self.config, raw, self.name), self.name)
        return cfg

    def check_inputs(self, n: int) -> None:
        hi = "any number of" if self.max_inputs is None else str(self.max_inputs)
        if n < self.min_inputs or (self.max_inputs is not None and n > self.max_inputs):
            want = str(self.min_inputs) if self.min_inputs == self.max_inputs else f"{self.min_inputs} to {hi}"
            raise ConfigError("IN", n, f"convert {self.name} takes {want} input model(s)")

    def __call__(self, models: Sequence[nn.Module], cfg: Section, filter_fn: FilterFn | None = None) -> nn.Module:
        from moesaic.transforms.convert_structure import sync_structure_

        self.check_inputs(len(models))
        return sync_structure_(self.fn(models[0], cfg, filter_fn, extra=tuple(models[1:])))


CONVERTERS: Registry[Converter] = Registry(
    "converter", "moesaic.transforms", base="moesaic.transforms.convert:Converter")


def converter(name: str, config: type[Section], *, inputs: tuple[int, int | None] = (1, 1),
              doc: str = "") -> Callable[[VerbFn], VerbFn]:
    """Decorator: register ``fn`` as the verb ``name`` with its config class and input count."""

    def deco(fn: VerbFn) -> VerbFn:
        line = doc or next((s.strip() for s in (fn.__doc__ or "").splitlines() if s.strip()), "")
        CONVERTERS.add(name, Converter(name, fn, config, inputs[0], inputs[1], line), doc=line)
        return fn

    return deco
