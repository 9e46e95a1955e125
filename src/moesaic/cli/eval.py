"""``moesaic eval CKPT [--set k=v ...]``: validation loss and perplexity of a checkpoint on its data."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="validation loss / perplexity of a checkpoint (a step dir or a run dir)")
    p.add_argument("checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data/eval setting, e.g. --set data.eval_windows=128")
    return p


def run(args: argparse.Namespace) -> int:
    import math

    import torch

    import moesaic
    from moesaic.config import apply_overrides, loads_yaml
    from moesaic.run_config import load_run_config
    from moesaic.train.loss import lm_loss_sum

    model = moesaic.load(args.checkpoint)
    raw = apply_overrides(loads_yaml(moesaic.config.dump_yaml(model.run_config)), args.overrides)
    cfg = load_run_config(data=raw)
    data = cfg.data.build()
    total, n = 0.0, 0
    with torch.no_grad():
        for b in data.eval_batches(cfg.train.eval_batch_size or cfg.train.batch_size):
            s, k = lm_loss_sum(model(b["input_ids"]).logits, b["labels"])
            total, n = total + float(s), n + k
    loss = total / max(n, 1)
    print(f"val_loss {loss:.4f}  val_ppl {math.exp(min(loss, 50)):.2f}  tokens {n}")
    return 0
