"""Typed configs: nested dataclasses, strict YAML, ``--set`` overrides, validation with field paths.

Every component has a dataclass config. Swappable components (routers, dispatchers, experts, attention,
models, datasets, schedules) derive from :class:`ComponentConfig`; their ``kind`` field names a registry
entry (a registered name or a ``module.path:Class`` plugin) whose class carries the concrete ``Config``.
A Config's default ``kind`` is the name its class was registered under, so the name is written once.
Parsing is strict: unknown keys, wrong types, duplicate YAML keys and python tags raise
:class:`~moesaic.core.errors.ConfigError` with the field path, the value and the rule.

Simple numeric rules are declared on the field (``field(default=1, metadata={"ge": 1})``); rules that
involve several fields go in ``validate(self, path)``, rules that involve the MoE layer a component sits in
in ``validate_moe(self, path, layer)``. Validation runs on the whole tree when a config is
loaded, before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Protocol, TypeVar, Union

import yaml

from moesaic.core.errors import ConfigError, RegistryError
from moesaic.core.registry import ComponentRegistry
from moesaic.core.yaml_io import apply_overrides, load_yaml, loads_yaml

C = TypeVar("C", bound="ComponentConfig")

__all__ = [
    "Section", "ComponentConfig", "LayerShape", "ConfigError", "parse", "to_dict", "validate_tree", "load_yaml",
    "loads_yaml", "apply_overrides", "dump_yaml", "require", "rule",
]


def rule(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
         le: float | None = None, lt: float | None = None, finite: bool = True,
         default_factory: Any = dataclasses.MISSING, doc: str = "") -> Any:
    """A dataclass field with declarative numeric rules, checked by :func:`validate_tree`."""
    meta: dict[str, Any] = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    meta["finite"] = finite
    if doc:
        meta["doc"] = doc
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _j(path: str) -> str:
    return f"{path}." if path else ""


def require(cond: bool, path: str, value: Any, message: str) -> None:
    if not cond:
        raise ConfigError(path, value, message)


@dataclasses.dataclass
class Section:
    """Base of every config dataclass. Override :meth:`validate` for rules across fields."""

    def validate(self, path: str) -> None:  # noqa: B027 - optional hook
        pass


class LayerShape(Protocol):
    """What a component's layer-level rules read: the MoE layer's routed expert count and k (after
    fine-grained segmentation) and its sibling configs (``MoEConfig`` is one)."""

    @property
    def routed_experts(self) -> int: ...

    @property
    def routed_top_k(self) -> int: ...

    @property
    def router(self) -> ComponentConfig: ...

    @property
    def dispatcher(self) -> ComponentConfig: ...

    @property
    def experts(self) -> ComponentConfig: ...


@dataclasses.dataclass
class ComponentConfig(Section):
    """A config whose ``kind`` selects a registered class; ``build`` instantiates it.

    ``kind`` defaults to the name the Config's class was registered under (its nearest registered base,
    else the registry's default entry), so a registered Config never repeats its name."""

    registry: ClassVar[ComponentRegistry | None] = None
    kind: str = ""

    def __post_init__(self) -> None:
        if not self.kind:
            self.kind = type(self).default_kind()

    @classmethod
    def default_kind(cls) -> str:
        return cls.registry.kind_of_config(cls) if cls.registry is not None else ""

    @classmethod
    def for_kind(cls: type[C], kind: str | None = None) -> C:
        """The default Config of entry ``kind`` (the registry's default entry when None)."""
        assert cls.registry is not None, f"{cls.__name__} has no registry"
        name = kind or cls.registry.default
        cfg_cls = cls.registry.config_of(name)
        if cfg_cls is None or not issubclass(cfg_cls, cls):
            raise TypeError(f"{cls.registry.kind} {name!r}: its Config must subclass {cls.__name__}")
        return cfg_cls()

    def validate_moe(self, path: str, layer: LayerShape) -> None:  # noqa: B027 - optional hook
        """Rules that involve the MoE layer this component sits in (``path`` is the component's own
        path); :meth:`MoEConfig.validate` calls it on the router, the dispatcher and the experts.
        Override and call super()."""

    def build(self, *args: Any, **kwargs: Any) -> Any:
        assert self.registry is not None, f"{type(self).__name__} has no registry"
        return self.registry.get(self.kind)(self, *args, **kwargs)


# --------------------------------------------------------------------------------------------- parsing

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _resolve_component(base: type[ComponentConfig], data: Mapping[str, Any], path: str,
                       default_kind: str) -> tuple[type[ComponentConfig], str]:
    reg = base.registry
    assert reg is not None, f"{base.__name__} has no registry"
    kind = data.get("kind", default_kind)
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"{_j(path)}kind", kind, f"must name a {reg.kind}; known: {', '.join(reg.names())}")
    try:
        cfg_cls = reg.config_of(kind)
    except RegistryError as e:
        raise ConfigError(f"{_j(path)}kind", kind, e.rule) from None
    if not (isinstance(cfg_cls, type) and issubclass(cfg_cls, base)):
        raise ConfigError(f"{_j(path)}kind", kind, f"a {reg.kind}'s Config must subclass {base.__name__}")
    return cfg_cls, kind


def parse(tp: Any, data: Any, path: str = "") -> Any:
    """Parse plain data (from YAML) into the typed value ``tp``. Strict: no coercion but int -> float."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return data
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None:
            if type(None) in args:
                return None
            raise ConfigError(path, data, f"must be {_type_name(tp)}, not null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return parse(a, data, path)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(path, data, f"must be {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if data not in choices or type(data) is not type(next((c for c in choices if c == data), data)):
            raise ConfigError(path, data, f"must be one of {', '.join(map(repr, choices))}")
        return data
    if tp is bool:
        if not isinstance(data, bool):
            raise ConfigError(path, data, "must be true or false")
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise ConfigError(path, data, "must be an integer")
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise ConfigError(path, data, "must be a number")
        try:
            return float(data)
        except OverflowError:  # an integer beyond float64 (10**309 and up)
            raise ConfigError(path, None, f"an integer of {int(data).bit_length()} bits is too large for a number (at "
                              "most about 1.8e308)", show_value=False) from None
    if tp is str:
        if not isinstance(data, str):
            raise ConfigError(path, data, "must be a string")
        return data
    if origin in (list, tuple):
        if not isinstance(data, (list, tuple)):
            raise ConfigError(path, data, "must be a list")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(data):
                raise ConfigError(path, data, f"must be a list of {len(args)} items")
            return tuple(parse(a, v, f"{_j(path)}{i}") for i, (a, v) in enumerate(zip(args, data)))
        el = args[0] if args else Any
        out = [parse(el, v, f"{_j(path)}{i}") for i, v in enumerate(data)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(data, Mapping):
            raise ConfigError(path, data, "must be a mapping")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {parse(kt, k, f"{_j(path)}{k}"): parse(vt, v, f"{_j(path)}{k}") for k, v in data.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, data, path)
    raise TypeError(f"{path}: unsupported config type {tp!r}")


def _parse_dataclass(cls: type, data: Any, path: str, default_kind: str | None = None) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(path, data, f"must be a mapping ({cls.__name__})")
    kind = None
    if issubclass(cls, ComponentConfig) and cls.registry is not None:
        kind_default = default_kind if default_kind is not None else cls.default_kind()
        cls, kind = _resolve_component(cls, data, path, kind_default)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            from difflib import get_close_matches

            near = get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{_j(path)}{key}", data[key], f"unknown key{hint}")
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            ftype = hints[name]
            sub = f"{_j(path)}{name}"
            if isinstance(ftype, type) and issubclass(ftype, ComponentConfig) and ftype.registry is not None:
                kwargs[name] = _parse_dataclass(ftype, data[name], sub, _field_default_kind(f))
            else:
                kwargs[name] = parse(ftype, data[name], sub)
    obj = cls(**kwargs)
    if kind is not None:
        obj.kind = kind
    return obj


def _field_default_kind(f: dataclasses.Field[Any]) -> str | None:
    if f.default_factory is not dataclasses.MISSING:
        return getattr(f.default_factory(), "kind", None)
    if f.default is not dataclasses.MISSING and f.default is not None:
        return getattr(f.default, "kind", None)
    return None


# ------------------------------------------------------------------------------------------ validation

def validate_tree(obj: Any, path: str = "") -> Any:
    """Check declared field rules, then each section's ``validate``, depth first. Returns ``obj``."""
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            validate_tree(v, f"{_j(path)}{i}")
        return obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            validate_tree(v, f"{_j(path)}{k}")
        return obj
    if not dataclasses.is_dataclass(obj):
        return obj
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        sub = f"{_j(path)}{f.name}"
        if isinstance(v, float) and f.metadata.get("finite", True) and not math.isfinite(v):
            raise ConfigError(sub, v, "must be a finite number")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            m = f.metadata
            if "ge" in m and not v >= m["ge"]:
                raise ConfigError(sub, v, f"must be >= {m['ge']}")
            if "gt" in m and not v > m["gt"]:
                raise ConfigError(sub, v, f"must be > {m['gt']}")
            if "le" in m and not v <= m["le"]:
                raise ConfigError(sub, v, f"must be <= {m['le']}")
            if "lt" in m and not v < m["lt"]:
                raise ConfigError(sub, v, f"must be < {m['lt']}")
        validate_tree(v, sub)
    if isinstance(obj, Section):
        obj.validate(path)
    return obj


# -------------------------------------------------------------------------------------------- to dict

def to_dict(obj: Any) -> Any:
    """Plain data (YAML-safe) of a config tree; ``parse(type(obj), to_dict(obj))`` round-trips."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------- YAML

def dump_yaml(obj: Any) -> str:
    return str(yaml.safe_dump(to_dict(obj), sort_keys=False))
