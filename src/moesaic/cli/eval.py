"""``moesaic eval CKPT [--set k=v ...]``: validation metrics of a checkpoint on its data: loss and
perplexity for a language model, loss and accuracy (with the majority-class baseline) for a classifier.
A language model can be evaluated under the MoE decoding strategies (``--top-k``, ``--scmoe``, ``--drop``,
``--early-exit``; docs/inference.md)."""

from __future__ import annotations

import argparse

from moesaic.cli import SubParsers, _decode_flags


def add_parser(sub: SubParsers) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="validation loss / perplexity (LM) or accuracy (classifier) of a checkpoint "
                                    "(a step dir or a run dir)")
    p.add_argument("checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data/eval setting, e.g. --set data.eval_windows=128")
    _decode_flags.add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    import moesaic
    from moesaic.core.config import apply_overrides, dump_yaml, loads_yaml
    from moesaic.train.loss import count_valid
    from moesaic.train.run_config import load_run_config
    from moesaic.train.task import eval_batch_size, evaluate, select_task

    model = moesaic.load(args.checkpoint)
    raw = apply_overrides(loads_yaml(dump_yaml(model.run_config)), args.overrides)
    cfg = load_run_config(data=raw)
    data = cfg.data.build()
    task = select_task(cfg, data)
    batches = data.eval_batches(eval_batch_size(cfg.train))
    lm, info = _decode_flags.apply(args, model) if task.kind == "lm" else (model, {})
    m = evaluate(lm, task, batches)
    n = sum(count_valid(b["labels"]) for b in batches)
    if task.kind == "classification":
        base = data.majority_baseline() if hasattr(data, "majority_baseline") else float("nan")
        print(f"val_loss {m['val_loss']:.4f}  val_accuracy {m['val_accuracy']:.4f}  "
              f"majority_baseline {base:.4f}  sequences {n}")
    elif task.kind == "lm":
        extra = "".join(f"  {k} {v}" for k, v in info.items())
        stats = getattr(lm, "exit_stats", None)
        if callable(stats):
            extra += f"  mean_exit_layer {stats()['mean_exit_layer']:.2f}"
        print(f"val_loss {m['val_loss']:.4f}  val_ppl {m['val_ppl']:.2f}  tokens {n}{extra}")
    else:
        print(f"{task.eval_line(m)}  targets {n}")
    return 0
