"""``moesaic analyze CKPT_OR_HF_DIR --data CONFIG_OR_TEXT --out DIR [--compare OTHER]``: what the experts do,
as ``DIR/report.html`` (static, opens from disk), ``DIR/stats.json`` and PNG figures (docs/analysis.md)."""

from __future__ import annotations

import argparse

from moesaic.cli import SubParsers


def add_parser(sub: SubParsers) -> argparse.ArgumentParser:
    p = sub.add_parser("analyze", help="routing report of a checkpoint or Hugging Face model (HTML, JSON, PNG)")
    p.add_argument("model", metavar="CKPT_OR_HF_DIR")
    p.add_argument("--data", required=True, help="a YAML run config (its Shakespeare data) or a plain text file")
    p.add_argument("--out", required=True, help="a new folder for report.html, stats.json and the figures")
    p.add_argument("--compare", default=None, metavar="OTHER", help="a second model: the report shows differences")
    p.add_argument("--passages", type=int, default=256, help="passages to run (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", type=int, default=4, help="ranks for the suggested expert placement")
    p.add_argument("--target-hit-rate", type=float, default=0.9, help="for the suggested expert cache size")
    p.add_argument("--no-timing", action="store_true", help="skip the measured cost model")
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import moesaic
    from moesaic.analysis.run import analyze, check_out
    from moesaic.core.errors import ConfigError

    if args.passages < 1:
        raise ConfigError("--passages", args.passages, "must be >= 1")
    if not 0.0 < args.target_hit_rate <= 1.0:
        raise ConfigError("--target-hit-rate", args.target_hit_rate, "must be in (0, 1]")
    if args.ranks < 1:
        raise ConfigError("--ranks", args.ranks, "must be >= 1")
    check_out(Path(args.out))
    model = moesaic.load(args.model)
    other = moesaic.load(args.compare) if args.compare else None
    out = analyze(model, args.data, args.out, where=args.model, compare=other, compare_where=args.compare or "",
                  passages=args.passages, seed=args.seed, ranks=args.ranks, target_hit_rate=args.target_hit_rate,
                  timing=not args.no_timing)
    print(f"wrote {out}/report.html, stats.json and figures")
    return 0
