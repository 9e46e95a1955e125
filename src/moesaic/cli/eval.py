"""``moesaic eval CKPT [--set k=v ...]``: validation metrics of a checkpoint on its data: loss and
perplexity for a language model, loss and accuracy (with the majority-class baseline) for a classifier.
A language model can be evaluated under the MoE decoding strategies (``--top-k``, ``--scmoe``, ``--drop``,
``--early-exit``; docs/inference.md). An image classifier also gets its robust accuracy under L-inf PGD
(``--pgd-eps E [--pgd-steps N] [--pgd-alpha A]``; by default for a run trained with the ``advmoe`` objective,
with its ``eps`` and ``eval_steps``; docs/zoo.md, "AdvMoE")."""

from __future__ import annotations

import argparse
import math
from typing import Any

from moesaic.cli import SubParsers, _decode_flags


def add_parser(sub: SubParsers) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="validation loss / perplexity (LM) or accuracy (classifier) of a checkpoint "
                                    "(a step dir or a run dir)")
    p.add_argument("checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data/eval setting, e.g. --set data.eval_windows=128")
    g = p.add_argument_group("robust accuracy (L-inf PGD on the classifier's pixels, docs/zoo.md \"AdvMoE\")")
    g.add_argument("--pgd-eps", type=float, default=None, metavar="E",
                   help="attack radius (default: the advmoe objective's eps for runs trained with it, else none)")
    g.add_argument("--pgd-steps", type=int, default=None, metavar="N",
                   help="attack steps (default: the advmoe objective's eval_steps, else 20)")
    g.add_argument("--pgd-alpha", type=float, default=None, metavar="A", help="step size (default 2.5 E / N)")
    _decode_flags.add_arguments(p)
    return p


def _pgd(args: argparse.Namespace, objective: Any, task_kind: str) -> tuple[float, int, float | None] | None:
    """(eps, steps, alpha) of the robust-accuracy attack the flags and the run's objective ask for, or None."""
    from moesaic.core.errors import ConfigError
    from moesaic.train.objectives.advmoe import AdvMoEConfig

    adv = objective if isinstance(objective, AdvMoEConfig) else None
    eps = args.pgd_eps if args.pgd_eps is not None else (adv.eps if adv is not None else None)
    if eps is None:
        if args.pgd_steps is not None or args.pgd_alpha is not None:
            raise ConfigError("--pgd-eps", None, "--pgd-steps and --pgd-alpha need an attack radius")
        return None
    steps = args.pgd_steps if args.pgd_steps is not None else (adv.eval_steps if adv is not None else 20)
    if not (eps >= 0 and math.isfinite(eps)) or steps < 1 or (args.pgd_alpha is not None and not args.pgd_alpha > 0):
        raise ConfigError("--pgd-eps", eps, "needs eps >= 0 (finite), --pgd-steps >= 1 and --pgd-alpha > 0")
    if task_kind != "classification":
        raise ConfigError("--pgd-eps", eps, f"robust accuracy is defined for classifiers, not a {task_kind} model")
    return eps, steps, args.pgd_alpha


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
    pgd = _pgd(args, cfg.train.objective, task.kind)
    lm, info = _decode_flags.apply(args, model) if task.kind == "lm" else (model, {})
    m = evaluate(lm, task, batches)
    n = sum(count_valid(b["labels"]) for b in batches)
    if task.kind == "classification":
        base = data.majority_baseline() if hasattr(data, "majority_baseline") else float("nan")
        robust = ""
        if pgd is not None:
            from moesaic.train.adversarial import robust_accuracy

            eps, steps, alpha = pgd
            key = getattr(cfg.train.objective, "input_key", "pixel_values")
            acc = robust_accuracy(model, task, batches, eps, steps, alpha, key=key,
                                  lo=getattr(cfg.train.objective, "clip_min", 0.0),
                                  hi=getattr(cfg.train.objective, "clip_max", 1.0))
            robust = f"  robust_accuracy {acc:.4f} (PGD eps {eps:g}, {steps} steps)"
        print(f"val_loss {m['val_loss']:.4f}  val_accuracy {m['val_accuracy']:.4f}  "
              f"majority_baseline {base:.4f}  sequences {n}{robust}")
    elif task.kind == "lm":
        extra = "".join(f"  {k} {v}" for k, v in info.items())
        stats = getattr(lm, "exit_stats", None)
        if callable(stats):
            extra += f"  mean_exit_layer {stats()['mean_exit_layer']:.2f}"
        print(f"val_loss {m['val_loss']:.4f}  val_ppl {m['val_ppl']:.2f}  tokens {n}{extra}")
    else:
        print(f"{task.eval_line(m)}  targets {n}")
    return 0
