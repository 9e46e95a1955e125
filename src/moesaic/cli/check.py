"""``moesaic check CONFIG [--set k=v ...]``: validate a config without building anything."""

from __future__ import annotations

import argparse

from moesaic.cli import SubParsers


def add_parser(sub: SubParsers) -> argparse.ArgumentParser:
    p = sub.add_parser("check", help="validate a YAML config (exit 0, or 2 with one error line)")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.moe.top_k=2 (repeatable)")
    return p


def run(args: argparse.Namespace) -> int:
    from moesaic.cli._config_file import load_run_config_file

    cfg = load_run_config_file(args.config, args.overrides)
    print(f"ok: {args.config} (model {cfg.model.kind}, data {cfg.data.kind})")
    return 0
