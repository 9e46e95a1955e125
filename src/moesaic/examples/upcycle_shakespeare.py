"""Sparse upcycling on Shakespeare (Komatsuzaki et al. 2023): train the demo's dense twin for N steps, upcycle it
(8 copies, top-2, renormalised: exact at step 0), then continue the MoE and the dense model for the same M
steps on the same tokens, for several seeds. Writes ``results.json``, ``curves.png`` and ``table.md``.

``python -m moesaic.examples.upcycle_shakespeare --out runs/upcycle [--seeds 0 1 2] [--pretrain 300]
[--continue 200] [--set key=value ...]`` (``--set`` applies to the demo config before the dense twin is built;
the defaults shrink the demo shape so that 3 seeds finish on a shared 2-core machine; docs/convert.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from moesaic.core.config import to_dict
from moesaic.distributed.expert_state import local_model_state
from moesaic.examples.demo import count_params, dense_twin
from moesaic.train.checkpoint import load_model
from moesaic.train.run_config import RunConfig, load_run_config
from moesaic.train.trainer import Trainer
from moesaic.transforms.upcycle import UpcycleConfig, upcycle_

#: The reduced demo shape (documented in docs/convert.md): half the width, 2 layers, 64-token windows.
SMALL = ["model.d_model=64", "model.num_layers=2", "model.max_seq_len=64", "data.seq_len=64", "data.eval_windows=32",
         "train.batch_size=16", "train.threads=1", "train.log_every=25", "train.save_every=100000",
         "train.tensorboard=false", "train.progress=false"]


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token: 2 per active weight of every matmul (embeddings are lookups, the tied LM head
    counts) plus causal attention, ``2 * 2 * L * (S/2) * D`` (scores and values over S/2 keys on average)."""
    _, active = count_params(model)
    cfg: Any = model.cfg
    emb = cfg.require_vocab() * cfg.d_model
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    matmul = active - norms - (0 if cfg.tie_word_embeddings else emb)  # tied: the head's matmul counts once
    return 2.0 * matmul + 2.0 * cfg.num_layers * seq_len * cfg.d_model


def run(cfg: RunConfig, out: Path, init: dict[str, torch.Tensor] | None = None) -> list[tuple[int, float]]:
    if not (out / "metrics.jsonl").is_file() or not (out / "LATEST").is_file():
        Trainer(cfg, out, resume=True, init_state=init, init_from=str(out)).run()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def val_loss(cfg: RunConfig, model: torch.nn.Module, out: Path) -> float:
    """The validation loss of ``model`` on the run's evaluation windows (step 0 of a continuation)."""
    t = Trainer(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=0)), out,
                init_state=local_model_state(model), init_from="step 0")
    return float(t.evaluate()["val_loss"])


def experiment_args(argv: list[str] | None, description: str, out: str,
                    steps: list[tuple[str, str, int, str]]) -> tuple[argparse.Namespace, RunConfig]:
    """The command line of the Shakespeare conversion experiments (config, output folder, seeds, the step
    counts ``steps`` as ``(flag, dest, default, help)``, evaluation interval, config overrides) and their base
    run: the config's dense twin at the experiment's small size, on one thread."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--out", default=out)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    for flag, dest, default, help_ in steps:
        ap.add_argument(flag, dest=dest, type=int, default=default, help=help_)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    return a, dense_twin(load_run_config(a.config, [*SMALL, *a.overrides]))


def main(argv: list[str] | None = None) -> int:
    a, base = experiment_args(argv, __doc__.split("\n\n")[0], "runs/upcycle_shakespeare",
                              [("--pretrain", "pretrain", 300, "dense steps before upcycling (N)"),
                               ("--continue", "cont", 200, "steps of both continuations (M)")])
    out = Path(a.out)
    results: dict[str, Any] = {"pretrain_steps": a.pretrain, "continue_steps": a.cont, "seeds": a.seeds, "runs": {}}
    for seed in a.seeds:
        tr = dataclasses.replace(base.train, seed=seed, max_steps=a.pretrain, eval_every=a.pretrain)
        pre_cfg = dataclasses.replace(base, train=tr)
        run(pre_cfg, out / f"dense-pre-{seed}")
        dense: Any = load_model(out / f"dense-pre-{seed}").train()
        # the continuation: fresh AdamW with warmup, another data seed (tokens the pretraining did not start on),
        # the same for both models
        ctr = dataclasses.replace(base.train, seed=1000 + seed, max_steps=a.cont, eval_every=a.eval_every)
        dense_cfg = dataclasses.replace(pre_cfg, model=dense.cfg, train=ctr)
        state = local_model_state(dense)
        moe: Any = upcycle_(dense, UpcycleConfig(seed=seed))
        moe_cfg = dataclasses.replace(dense_cfg, model=moe.cfg)
        rec: dict[str, Any] = {}
        for name, cfg, init in (("dense", dense_cfg, state), ("moe", moe_cfg, local_model_state(moe))):
            d = out / f"{name}-cont-{seed}"
            step0 = val_loss(cfg, moe if name == "moe" else load_model(out / f"dense-pre-{seed}"), out / "scratch")
            curve = [(0, step0), *run(cfg, d, init)]
            model = cfg.model.build()
            total, active = count_params(model)
            rec[name] = {"curve": curve, "total_params": total, "active_params": active,
                         "flops_per_token": flops_per_token(model, cfg.data.seq_len)}  # type: ignore[attr-defined]
        results["runs"][str(seed)] = rec
        results["config"] = {"dense": to_dict(dense_cfg.model), "moe": to_dict(moe_cfg.model)}
        (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)
    return 0


def write_report(results: dict[str, Any], out: Path) -> None:
    """``table.md`` (mean and std over seeds at every evaluated step) and ``curves.png`` (mean +- std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(results["runs"].values())
    lines = ["| step | dense val loss | upcycled MoE val loss | MoE - dense |", "|---:|---:|---:|---:|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    stats: dict[str, list[tuple[int, float, float]]] = {}
    for name in ("dense", "moe"):
        steps = [s for s, _ in runs[0][name]["curve"]]
        by_step = [[dict(r[name]["curve"])[s] for r in runs] for s in steps]
        stats[name] = [(s, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                       for s, v in zip(steps, by_step, strict=True)]
        m = [x[1] for x in stats[name]]
        sd = [x[2] for x in stats[name]]
        ax.plot(steps, m, label=f"{name} (mean of {len(runs)} seeds)")
        ax.fill_between(steps, [a - b for a, b in zip(m, sd, strict=True)], [a + b for a, b in zip(m, sd, strict=True)],
                        alpha=0.25)
    for (s, dm, ds), (_, mm, ms) in zip(stats["dense"], stats["moe"], strict=True):
        diffs = [dict(r["moe"]["curve"])[s] - dict(r["dense"]["curve"])[s] for r in runs]
        dd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        lines.append(f"| {s} | {dm:.4f} ± {ds:.4f} | {mm:.4f} ± {ms:.4f} | {statistics.mean(diffs):+.4f} ± {dd:.4f} |")
    r0 = runs[0]
    lines += ["", "| model | total params | active params | FLOPs/token (forward) |", "|---|---:|---:|---:|"]
    for name in ("dense", "moe"):
        lines.append(f"| {name} | {r0[name]['total_params']:,} | {r0[name]['active_params']:,} | "
                     f"{r0[name]['flops_per_token']:,.0f} |")
    ax.set_xlabel(f"continued steps after {results['pretrain_steps']} dense steps")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Sparse upcycling on Shakespeare (± 1 std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not math.isfinite(stats["moe"][-1][1]):
        raise SystemExit("non-finite validation loss")


if __name__ == "__main__":
    raise SystemExit(main())
