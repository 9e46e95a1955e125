"""``moesaic list``: every registered component with a one-line description."""

from __future__ import annotations

import argparse

from moesaic.cli import SubParsers


def add_parser(sub: SubParsers) -> argparse.ArgumentParser:
    return sub.add_parser("list", help="list registered routers, dispatchers, experts, backends, models, datasets")


def run(args: argparse.Namespace) -> int:
    from moesaic.core.registry import DATASETS, DISPATCHERS, EXPERTS, MODELS, ROUTERS, SCHEDULES
    from moesaic.moe.experts.backends import BACKENDS

    for title, reg in (("routers", ROUTERS), ("dispatchers", DISPATCHERS), ("experts", EXPERTS),
                       ("models", MODELS), ("datasets", DATASETS), ("schedules", SCHEDULES)):
        print(f"{title}:")
        for name in reg.names():
            print(f"  {name:<22} {reg.describe(name)}")
    print("expert backends:")
    for name, fn in sorted(BACKENDS.items()):
        doc = (fn.__doc__ or "").strip().splitlines()
        print(f"  {name:<22} {doc[0] if doc else ''}")
    return 0
