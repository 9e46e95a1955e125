"""Registries: one typed :class:`Registry` per plugin kind (routers, dispatchers, experts, expert backends,
attention kinds, models, datasets, schedules, HF architectures, training objectives).

A component registers itself by name, written once; a class with a ``Config`` defined next to it (in the
same module) also makes that name its Config's default ``kind``::

    @ROUTERS.register("topk")
    class TopKRouter(Router):
        '''Token-choice top-k (Shazeer 2017, Mixtral, DeepSeek-V3).'''
        Config = TopKRouterConfig      # TopKRouterConfig().kind == "topk"

An entry is found three ways (docs/design.md, "Registries and plugins"):

* by name: the registry's own package is imported on first lookup, so adding a router inside the
  package is adding one file;
* by dotted path, ``mypkg.routers:MyRouter``: the module is imported, the object checked against the
  registry's base class and registered under that dotted name (so a saved config loads again);
* by the Python entry-point group ``moesaic.plugins``: each entry point names a module whose import
  registers its classes; all of them are imported once, on the first lookup in any registry.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from collections.abc import Callable, Iterator
from difflib import get_close_matches
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, cast

from moesaic.core.errors import PluginError, RegistryError

if TYPE_CHECKING:
    from moesaic.core.schedules import Schedule

T = TypeVar("T")


class RegistryView(Protocol):
    """What listing a registry needs (``moesaic list``, the contract tests), whatever its entry type."""

    kind: str

    def names(self) -> list[str]: ...

    def describe(self, name: str) -> str: ...


class ComponentRegistry(RegistryView, Protocol):
    """What a config needs of the registry its ``kind`` selects from: entries are classes built from a Config."""

    default: str

    def get(self, name: str) -> Callable[..., object]: ...

    def config_of(self, name: str) -> type | None: ...

    def kind_of_config(self, cfg_cls: type) -> str: ...

    def __contains__(self, name: object) -> bool: ...

#: The entry-point group of out-of-tree plugins: each entry point's value is a module to import.
PLUGIN_GROUP = "moesaic.plugins"
_plugins_loaded = False


def load_plugins() -> None:
    """Import every ``moesaic.plugins`` entry point once (later calls do nothing)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # first: a plugin that looks a name up while it is imported must not recurse
    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            importlib.import_module(ep.value)
        except Exception as e:
            raise PluginError(f"entry point {ep.name} = {ep.value!r} (group {PLUGIN_GROUP}) failed to import: "
                              f"{type(e).__name__}: {e}") from e


def _resolve_dotted(path: str) -> object:
    """The object ``module.path:Attr.Sub`` names; :class:`RegistryError` when it cannot be found."""
    module, _, attr = path.partition(":")
    if not module or not attr or ":" in attr:
        raise RegistryError(path, "must look like module.path:ClassName")
    try:
        obj: object = importlib.import_module(module)
    except Exception as e:  # any failure while importing user code is a lookup failure of this field
        raise RegistryError(path, f"cannot import module {module!r} ({type(e).__name__}: {e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RegistryError(path, f"module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Named entries of one plugin kind.

    ``kind`` names the kind in messages ("router"); ``package`` is imported module by module (names
    starting with ``prefix``) on first lookup; ``base``, a ``module:Class`` path, is what an entry found
    by dotted path must subclass (or be an instance of); ``default`` is the entry a config without
    ``kind`` selects.
    """

    _all: list[RegistryView] = []

    def __init__(self, kind: str, package: str | None = None, *, base: str | None = None,
                 default: str = "", prefix: str = "") -> None:
        self.kind, self.package, self.base, self.default, self.prefix = kind, package, base, default, prefix
        self._entries: dict[str, T] = {}
        self._docs: dict[str, str] = {}
        self._config_kinds: dict[type, str] = {}
        self._configs: dict[str, type] = {}
        self._loaded = False
        Registry._all.append(self)

    @classmethod
    def all(cls) -> list[RegistryView]:
        """Every registry created so far (a package's registries exist once it is imported)."""
        return list(cls._all)

    # ------------------------------------------------------------------------------------ registering

    def register(self, name: str, *, doc: str = "") -> Callable[[T], T]:
        """Decorator: register the object under ``name`` (``doc`` overrides its docstring's first line)."""

        def deco(obj: T) -> T:
            return self.add(name, obj, doc=doc)

        return deco

    def add(self, name: str, obj: T, *, doc: str = "") -> T:
        """Register ``obj`` under ``name``; the same object may have several names (a dotted alias)."""
        if not name:
            raise ValueError(f"{self.kind}: empty name")
        if name in self._entries and self._entries[name] is not obj:
            raise RegistryError(name, f"{self.kind} {name!r} is registered twice")
        cfg = getattr(obj, "Config", None) if isinstance(obj, type) else None
        if isinstance(cfg, type):
            self._configs[name] = cfg
            if cfg.__module__ == getattr(obj, "__module__", None):  # a Config of its own names its kind
                self._claim(cfg, name)
        self._entries[name] = obj
        if doc:
            self._docs[name] = doc
        return obj

    def remove(self, name: str) -> None:
        """Forget entry ``name`` (and the default kind its Config had from it); tests use it to undo a lookup."""
        self._entries.pop(name, None)
        self._docs.pop(name, None)
        cfg = self._configs.pop(name, None)
        if cfg is not None and self._config_kinds.get(cfg) == name:
            del self._config_kinds[cfg]

    def _claim(self, cfg: type, name: str) -> None:
        owner = self._config_kinds.get(cfg)
        if owner is None or owner == name:
            self._config_kinds[cfg] = name
        elif ":" not in name:  # a dotted alias of an entry keeps the entry's name as the default kind
            raise RegistryError(name, f"{self.kind} {name!r}: its Config {cfg.__name__} already belongs to "
                                      f"{owner!r}; give each entry its own Config subclass")

    def kind_of_config(self, cfg_cls: type) -> str:
        """The entry name a Config class stands for: its own registration, else its nearest registered base,
        else the registry's default. Never imports anything (it runs while modules are being imported)."""
        for c in cfg_cls.__mro__:
            if c in self._config_kinds:
                return self._config_kinds[c]
        return self.default

    def config_of(self, name: str) -> type | None:
        """The ``Config`` class of entry ``name`` (looked up like :meth:`get`); None for entries without one."""
        self.get(name)
        return self._configs.get(name)

    # --------------------------------------------------------------------------------------- lookup

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.package is not None:
            pkg = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):  # a plain module: just import it
                if not info.name.startswith("_") and info.name.startswith(self.prefix):
                    importlib.import_module(f"{self.package}.{info.name}")
        load_plugins()

    def _check_kind(self, name: str, obj: object) -> T:
        if self.base is None:
            if not callable(obj):
                raise RegistryError(name, f"{name} is not a {self.kind}: not callable")
            return cast(T, obj)
        base = _resolve_dotted(self.base)
        ok = isinstance(obj, type) and isinstance(base, type) and issubclass(obj, base)
        if not ok and isinstance(base, type) and isinstance(obj, base):
            ok = True
        if not ok:
            what = obj.__name__ if isinstance(obj, type) else type(obj).__name__
            raise RegistryError(name, f"{name} ({what}) is not a {self.kind}: must subclass "
                                      f"{self.base.replace(':', '.')}")
        return cast(T, obj)

    def get(self, name: str) -> T:
        """The entry ``name`` (a registered name or ``module.path:Object``); :class:`RegistryError` if none."""
        self._load()
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            return self.add(name, self._check_kind(name, _resolve_dotted(name)))
        near = get_close_matches(name, self._entries, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise RegistryError(name, f"unknown {self.kind} kind; known: {', '.join(self.names())}{hint}",
                            message=f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}{hint}")

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is a registered name (dotted paths count once they have been looked up)."""
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
        """One line about the entry: the ``doc`` it was registered with, else its docstring's first line."""
        obj = self.get(name)
        if name in self._docs:
            return self._docs[name]
        doc = (obj.__doc__ if isinstance(obj, type) or callable(obj) else None) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


SCHEDULES: Registry[type[Schedule]] = Registry(
    "schedule", "moesaic.core.schedules", base="moesaic.core.schedules:Schedule", default="constant")
