"""Strict YAML for configs: duplicate keys, python tags and invalid documents are config errors
naming the file and line; ``--set key.path=value`` overrides edit the raw data before parsing."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from moesaic.core.errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """Safe loading that rejects duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(str(key), None, f"duplicate key (line {key_node.start_mark.line + 1})",
                                  show_value=False)
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


# PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a *string*; YAML 1.2 and every user read it as a float.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def loads_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader
    except ConfigError as e:
        raise ConfigError(f"{source}: {e.path}", None, e.rule, show_value=False) from None
    except yaml.constructor.ConstructorError as e:
        tag = getattr(e, "problem", "") or str(e)
        raise ConfigError(source, None, f"unsafe or unknown YAML tag ({tag.strip()}); only plain YAML is allowed",
                          show_value=False) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(source, None, f"invalid YAML{where}: {getattr(e, 'problem', e)}", show_value=False) from None


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(path), None, "config file not found", show_value=False)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), None, f"not a UTF-8 text file (byte {e.start})", show_value=False) from None
    data = loads_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(str(path), None, "top level must be a mapping", show_value=False)
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to raw config data; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", item, "must look like key.path=value")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError("--set", item, "must look like key.path=value")
        value = loads_yaml(raw, f"--set {key}") if raw.strip() else ""
        node: Any = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(".".join(parts[: i + 1]), part, f"no such list index (length {len(node)})")
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(".".join(parts[:i]), node, "is not a mapping, cannot set a key inside it")
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            node = nxt
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(key, last, f"no such list index (length {len(node)})")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(".".join(parts[:-1]), node, "is not a mapping, cannot set a key inside it")
    return data
