"""The package's shape rules that review enforces (issue 12): small files, and every public function typed.

mypy (``make lint``) checks annotations everywhere; this test keeps the public part from regressing even
where a mypy override is lenient, and runs with the unit tests."""

from __future__ import annotations

import ast
import pathlib

import moesaic

ROOT = pathlib.Path(moesaic.__file__).parent
SOURCES = sorted(ROOT.rglob("*.py"))
MAX_LINES = 400


def test_no_source_file_is_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert SOURCES and not long, f"split these by concept (at most {MAX_LINES} lines each): {long}"


def _public_functions(tree: ast.Module) -> list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, bool]]:
    """``(function, is_method)`` for module-level functions and methods of module-level classes whose names
    (function and class) do not start with ``_``. Nested functions are implementation details."""
    out: list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, bool]] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            out.append((node, False))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            out += [(f, True) for f in node.body
                    if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and not f.name.startswith("_")]
    return out


def missing_annotations(source: str) -> list[str]:
    """``name: what is missing`` for every public function of ``source`` without full annotations (every
    parameter but a method's ``self``/``cls``, ``*args``, ``**kwargs`` and the return)."""
    problems = []
    for fn, is_method in _public_functions(ast.parse(source)):
        a = fn.args
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *[p for p in (a.vararg, a.kwarg) if p is not None]]
        static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
        if is_method and not static and params and params[0].arg in ("self", "cls"):
            params = params[1:]
        missing = [p.arg for p in params if p.annotation is None]
        if fn.returns is None:
            missing.append("return")
        if missing:
            problems.append(f"{fn.name} (line {fn.lineno}): {', '.join(missing)}")
    return problems


def test_every_public_function_is_annotated() -> None:
    bad = {rel: m for p in SOURCES if (rel := p.relative_to(ROOT).as_posix())
           and (m := missing_annotations(p.read_text()))}
    assert not bad, f"public functions without full type annotations: {bad}"


def test_the_annotation_check_catches_what_it_should() -> None:
    src = '''
def typed(x: int, *a: int, k: str = "", **kw: float) -> int: ...
def untyped_param(x, y: int) -> int: ...
def no_return(x: int): ...
def _private(x): ...
class Public:
    def method(self, x: int) -> None: ...
    @classmethod
    def build(cls, **kw) -> None: ...
    @staticmethod
    def static(self) -> None: ...
    def _helper(self, x): ...
class _Hidden:
    def method(self, x): ...
def outer() -> None:
    def inner(x): ...
'''
    assert missing_annotations(src) == [
        "untyped_param (line 3): x", "no_return (line 4): return", "build (line 9): kw", "static (line 11): self",
    ]
