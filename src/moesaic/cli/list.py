"""``moesaic list``: every registry (routers, dispatchers, experts, expert backends, attention, models,
datasets, schedules, HF architectures, ...) with each entry's one-line description."""

from __future__ import annotations

import argparse
import importlib

from moesaic.cli import SubParsers

#: The modules that create the registries (each registry lives beside the base class of its entries, so
#: ``core`` never names a higher layer); importing them makes every registry exist.
REGISTRY_MODULES = (
    "moesaic.core.registry", "moesaic.moe.routing.base", "moesaic.moe.dispatch.base", "moesaic.moe.experts.base",
    "moesaic.moe.experts.backends", "moesaic.models.attention", "moesaic.models.base",
    "moesaic.train.datasets.base", "moesaic.train.objectives.base", "moesaic.interop.common",
    "moesaic.transforms.convert", "moesaic.inference.offload.policies",
)


def add_parser(sub: SubParsers) -> argparse.ArgumentParser:
    return sub.add_parser("list", help="list registered routers, dispatchers, experts, backends, models, datasets, "
                                       "schedules, attention kinds, HF architectures")


def run(args: argparse.Namespace) -> int:
    from moesaic.core.registry import Registry

    for module in REGISTRY_MODULES:
        importlib.import_module(module)
    for reg in Registry.all():
        print(f"{reg.kind if reg.kind.endswith('s') else reg.kind + 's'}:")
        for name in reg.names():
            print(f"  {name:<22} {reg.describe(name)}")
    legacy = importlib.import_module("moesaic.moe.experts.backends").BACKENDS
    if isinstance(legacy, dict):  # until the expert backends are a Registry
        print("expert backends:")
        for name, fn in sorted(legacy.items()):
            doc = (fn.__doc__ or "").strip().splitlines()
            print(f"  {name:<22} {doc[0] if doc else ''}")
    return 0
