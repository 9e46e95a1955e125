"""Registries of swappable components: one per kind (routers, dispatchers, experts, models, ...).

A component registers itself by name with a one-line description (its docstring's first line)::

    @ROUTERS.register("topk")
    class TopKRouter(Router):
        '''Token-choice top-k (Shazeer 2017, Mixtral, DeepSeek-V3).'''
        Config = TopKRouterConfig

Modules inside the registry's package are imported on first lookup, so adding a router is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self.package = package
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str):
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            try:
                obj.registry_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def _load(self) -> None:
        if self._loaded or self.package is None:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):  # a plain module: just import it
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            from difflib import get_close_matches

            near = get_close_matches(name, self._entries, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}{hint}")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        for n in sorted(self._entries):
            yield n, self._entries[n]

    def describe(self, name: str) -> str:
        doc = getattr(self.get(name), "__doc__", None) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


ROUTERS: Registry[Any] = Registry("router", "moesaic.moe.routing")
DISPATCHERS: Registry[Any] = Registry("dispatcher", "moesaic.moe.dispatch")
EXPERTS: Registry[Any] = Registry("experts", "moesaic.moe.experts")
MODELS: Registry[Any] = Registry("model", "moesaic.models")
DATASETS: Registry[Any] = Registry("dataset", "moesaic.train.datasets")
SCHEDULES: Registry[Any] = Registry("schedule", "moesaic.core.schedules")
#: Training objectives (``train.objective: {kind: NAME}``): the default task loss, THOR, ... (docs/training.md).
OBJECTIVES: Registry[Any] = Registry("objective", "moesaic.train.objectives")
