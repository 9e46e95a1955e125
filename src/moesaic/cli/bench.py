"""``moesaic bench TARGET``: benchmarks (speed and memory targets live here, never in unit tests).

Targets are the modules of ``moesaic.bench`` that define ``TARGET``, ``add_arguments(p)`` and ``run(args)``
(``layer``: one MoE layer against floors and peers). Each is also runnable as ``benchmarks/bench_TARGET.py``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import types

from moesaic.cli import SubParsers


def targets() -> dict[str, types.ModuleType]:
    import moesaic.bench as pkg

    out: dict[str, types.ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(mod, "TARGET") and hasattr(mod, "run"):
            out[mod.TARGET] = mod
    return out


def add_parser(sub: SubParsers) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmarks: " + ", ".join(targets()))
    tsub = p.add_subparsers(dest="target", metavar="TARGET", parser_class=type(p))
    tsub.required = True
    for name, mod in targets().items():
        tp = tsub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        mod.add_arguments(tp)
        tp.set_defaults(_target=mod)
    return p


def run(args: argparse.Namespace) -> int:
    return int(args._target.run(args) or 0)
