"""Read-ME pre-gates on a trained MoE LM: fit one per MoE layer on training batches, report the recall of
the layer's chosen experts in the pre-gate's top-k on the held-out validation batches (docs/convert.md).

Usage: ``python -m moesaic.examples.pregate_recall RUN_DIR [--batches 16] [--hidden 128] [--steps 300]``
where ``RUN_DIR`` is a finished ``moesaic train`` folder (its ``config.yaml`` names the data).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from moesaic.interop.load import load_any
from moesaic.train.run_config import load_run_config
from moesaic.transforms.pregate import PregateConfig, fit_pregates, pregate_recall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_run_config(Path(args.run_dir) / "config.yaml")
    data = cfg.data.build()
    model = load_any(args.run_dir).eval()
    loader = data.loader(123)
    train = [loader.next_batch(args.batch_size)["input_ids"] for _ in range(args.batches)]
    val = [b["input_ids"] for b in data.eval_batches(args.batch_size)]

    def run(batches: list[torch.Tensor]) -> Callable[[torch.nn.Module], object]:
        return lambda m: [m(x) for x in batches]

    gates = fit_pregates(model, PregateConfig(hidden=args.hidden, steps=args.steps), calibrate=run(train))
    rec = {"train": pregate_recall(model, gates, run(train)), "val": pregate_recall(model, gates, run(val))}
    print(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
