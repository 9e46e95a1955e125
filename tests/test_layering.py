"""The package reads bottom-up: every module imports only its own package and packages of lower layers
(docs/design.md, "Layers"). Function-level imports count too; ``TYPE_CHECKING`` imports do not."""

from __future__ import annotations

import ast
import pathlib

import moesaic

#: Lowest first. A subpackage may import itself and packages of strictly lower layers only.
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("moe",),
    ("models",),
    ("distributed",),
    ("train",),
    ("interop",),
    ("transforms",),
    ("peft",),
    ("inference",),
    ("analysis",),
    ("serve",),
    ("bench", "examples"),
    ("cli",),
]
LEVEL = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
ROOT = pathlib.Path(moesaic.__file__).parent
TOP = {"__init__", "__main__"}
# the package root re-exports the public surface; it may import anything


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports() -> list[tuple[str, str, int]]:
    """``(importing subpackage, imported subpackage, line)`` for every import of another subpackage."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        here = parts[0]
        if here in TOP:
            continue
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names]
                                         if node.module == "moesaic" else [])
            else:
                continue
            for name in names:
                q = name.split(".")
                if q[0] == "moesaic" and len(q) > 1 and q[1] != here:
                    out.append((f"{'/'.join(parts)}.py", q[1], node.lineno))
    return out


def test_every_subpackage_has_a_layer():
    subpackages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert subpackages <= set(LEVEL), f"subpackages without a layer: {sorted(subpackages - set(LEVEL))}"
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert modules <= TOP, f"modules at the package root belong in a layer: {sorted(modules - TOP)}"


def test_no_module_imports_upward_or_sideways():
    bad = []
    for where, target, line in imports():
        here = where.split("/")[0]
        if target in TOP or target not in LEVEL:
            bad.append(f"{where}:{line} imports moesaic.{target} (not a layered subpackage)")
        elif LEVEL[target] >= LEVEL[here]:
            bad.append(f"{where}:{line} imports moesaic.{target} (layer {LEVEL[target]}) from layer {LEVEL[here]}")
    assert not bad, "\n".join(bad)
