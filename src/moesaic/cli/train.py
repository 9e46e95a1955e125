"""``moesaic train CONFIG [--set k=v ...] [--out DIR] [--resume]``: train a model from a YAML config."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model from a YAML config (checkpoints and metrics in --out)")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=50 (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest valid checkpoint in --out (invalid ones are skipped)")
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moesaic.run_config import load_run_config
    from moesaic.train.trainer import Trainer

    cfg = load_run_config(args.config, args.overrides)
    out = args.out or str(Path("runs") / Path(args.config).stem)
    trainer = Trainer(cfg, out, resume=args.resume)
    code = trainer.run()
    s = trainer.summary
    val = f"  val_loss {s['val_loss']:.4f}" if "val_loss" in s else ""
    print(f"step {s['steps']}  loss {s.get('loss', float('nan')):.4f}{val}  {s['tokens_per_s']:.0f} tokens/s  "
          f"-> {out}")
    return code
