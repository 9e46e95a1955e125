"""The README's Python examples run as written, and every ``moesaic.*`` name and ``configs/*.yaml`` file it
mentions exists (the layout move renamed modules; a stale path in the README is a broken first step)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from moesaic.cli._config_file import load_run_config_file

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def _resolve(dotted: str) -> object:
    """The module or attribute ``dotted`` names: the longest importable prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_example_runs(index: int) -> None:
    code = BLOCKS[index]
    if not code.lstrip().startswith("import"):  # a continuation of the example above it
        code = BLOCKS[index - 1] + code
    exec(compile(code, f"README.md python block {index}", "exec"), {})  # noqa: S102 - our own README


def test_every_named_module_function_and_config_exists() -> None:
    names = set(re.findall(r"\bmoesaic(?:\.[A-Za-z_][A-Za-z0-9_]*)+", README))
    assert {"moesaic.load", "moesaic.interop.hf.from_hf"} <= names
    # ``moesaic.plugins`` is the name of the entry-point group plugins register in, not a module
    if "moesaic.plugins" in names:
        names.remove("moesaic.plugins")
        assert _resolve("moesaic.core.registry.PLUGIN_GROUP") == "moesaic.plugins"
    for dotted in sorted(names):
        assert _resolve(dotted) is not None, dotted
    assert callable(_resolve("moesaic.interop.hf.to_hf"))
    assert "MoEConfig" in README and hasattr(_resolve("moesaic.moe.layer"), "MoEConfig")
    configs = set(re.findall(r"configs/[A-Za-z0-9_/]+\.yaml", README))
    assert configs
    for rel in sorted(configs):
        load_run_config_file(str(REPO / rel))
