"""The shrinking and distillation experiment of docs/convert.md: on Shakespeare, per seed,

1. train the demo MoE (``configs/demo.yaml``) for ``--steps`` steps; validation loss on held-out plays;
2. prune half of each MoE layer's experts by saliency, by usage and at random, and merge them in pairs
   (average, OT-aligned): validation loss of each, with no further training;
3. train the same MoE student with ``train.objective: {kind: distill}`` from the dense demo twin (trained
   once, seed 0, same steps) and compare its validation loss with step 1's.

Usage: ``python -m moesaic.examples.shrink_distill --out runs/shrink --seeds 0,1,2 --steps 200``
(``--teacher-steps`` trains the teacher longer; a finished run found in ``--out`` is reused). Writes
``results.json`` and prints mean +- std (population std over seeds) per row.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer
from moesaic.transforms.merge import MergeConfig, merge_
from moesaic.transforms.prune import PruneConfig, prune_


def _cfg(base: Path, steps: int, seed: int, **train: Any) -> Any:
    import yaml

    raw = yaml.safe_load(base.read_text())
    raw["train"].update(max_steps=steps, seed=seed, eval_every=steps, save_every=steps, log_every=max(steps // 4, 1),
                        tensorboard=False, progress=False, warmup_steps=min(30, steps // 5), **train)
    return raw


def _train(raw: dict[str, Any], out: Path) -> Trainer:
    """Train into ``out``, or reload the finished run found there."""
    done = (out / "LATEST").exists()
    t = Trainer(load_run_config(data=raw), out, resume=done)
    if not done:
        t.run()
    return t


def _shrunk(t: Trainer, calib: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    def calibrate(m: torch.nn.Module) -> None:
        for b in calib:
            m(b["input_ids"])

    res = {"moe": t.evaluate()["val_loss"]}
    base = copy.deepcopy(t.model.state_dict())
    def pruner(by: Any) -> Callable[[torch.nn.Module], object]:
        return lambda m: prune_(m, PruneConfig(by=by, keep_fraction=0.5, seed=t.tc.seed), calibrate=calibrate)

    def merger(method: Any) -> Callable[[torch.nn.Module], object]:
        return lambda m: merge_(m, MergeConfig(method=method, fraction=0.5))

    verbs = {f"prune_{by}": pruner(by) for by in ("saliency", "usage", "random")}
    verbs.update({f"merge_{m}": merger(m) for m in ("average", "ot")})
    orig = t.model
    for name, verb in verbs.items():
        model = copy.deepcopy(orig)
        model.load_state_dict(base)
        verb(model)
        t.model = model
        res[name] = t.evaluate()["val_loss"]
    t.model = orig
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--out", default="runs/shrink_distill")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--teacher-steps", type=int, default=None, help="steps of the dense teacher (default --steps)")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out, base = Path(args.out), Path(args.config)
    out.mkdir(parents=True, exist_ok=True)
    from moesaic.examples.demo import dense_twin

    dense_raw = _cfg(base, args.teacher_steps or args.steps, 0)
    dense_cfg = dense_twin(load_run_config(data=dense_raw))
    from moesaic.core.config import to_dict

    dense_t = _train(to_dict(dense_cfg), out / "dense")
    results: dict[str, Any] = {"dense_teacher": dense_t.evaluate()["val_loss"], "seeds": {}}
    teacher = str(out / "dense")
    for seed in [int(s) for s in args.seeds.split(",")]:
        t = _train(_cfg(base, args.steps, seed), out / f"moe_s{seed}")
        loader = t.data.loader(1000 + seed)
        calib = [loader.next_batch(t.tc.batch_size) for _ in range(args.calib_batches)]
        row = _shrunk(t, calib)
        kd = _train(_cfg(base, args.steps, seed, objective={"kind": "distill", "teacher": teacher, "alpha": args.alpha,
                                                           "temperature": args.temperature}), out / f"kd_s{seed}")
        row["moe_distilled"] = kd.evaluate()["val_loss"]
        results["seeds"][seed] = row
        print(json.dumps({seed: row}), file=sys.stderr, flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    names = list(next(iter(results["seeds"].values())))
    print(f"dense teacher (seed 0): {results['dense_teacher']:.4f}")
    print("| model | val loss (mean +- std over seeds) | per seed |\n|---|---|---|")
    for n in names:
        v = [r[n] for r in results["seeds"].values()]
        sd = statistics.pstdev(v) if len(v) > 1 else 0.0
        print(f"| {n} | {statistics.mean(v):.4f} +- {sd:.4f} | {', '.join(f'{x:.4f}' for x in v)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
