"""``moesaic bench routers``: the router leaderboard. Every registered router that works in a causal LM
without labels trains the demo LM shape (``configs/demo.yaml``: its steps, tokens and seed set), with the
active expert parameters matched by k, and reports validation loss (mean and spread over seeds), load
imbalance, experts per token and training tokens/s (docs/papers.md, "Router leaderboard").

* **Eligible**: ``causal_ok`` routers whose only extra routing input is the model's own token ids (hash
  routing); expert choice and Soft MoE are not causal, task and domain routing need labels.
* **Matched active parameters**: the demo's 8 experts of width 384 are split ``granularity`` ways with
  ``top_k * granularity`` routed experts per token (3 of width 128). A router with a fixed k (Switch, hash,
  THOR, random partition: 1; GShard: 2) gets ``granularity = k`` and ``top_k = 1``, which keeps the routed
  width per token at 384 and the expert parameters unchanged (k=1: 8 experts of 384; k=2: 16 of 192).
  Variable-k routers (top-p, DTS, MoE++) keep the demo's split and report their measured experts per token.
* Each router runs with its own defaults (its ``Config``: balance-loss coefficients, normalisation), as its
  paper describes it; only the shape is shared.
* **Training runs** are separate ``moesaic train`` processes (one thread each, so results do not depend on
  the thread count), one folder per router and seed under ``--out``; a finished run is read back, an
  interrupted one resumes (``--resume``), so the leaderboard can be built over several sittings.
* **Tokens/s** is measured afterwards in one process, every router's trainer stepping in turn (shuffled
  rounds, median step time), so load from other processes hits all routers alike.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from moesaic.bench.measure import time_interleaved

TARGET = "routers"
def eligibility() -> dict[str, str]:
    """Router name -> "" when it enters the leaderboard, else why not."""
    from moesaic.moe.routing.base import ROUTERS

    out = {}
    for name, cls in ROUTERS.items():
        extra = set(cls.example_ctx(4)) - {"token_ids"}
        out[name] = ("not causal" if not cls.causal_ok else
                     f"needs labels ({', '.join(sorted(extra))})" if extra else
                     f"needs the {cls.requires_dispatcher} dispatcher" if cls.requires_dispatcher else "")
    return out


def overrides(name: str) -> list[str]:
    """``--set`` overrides that put router ``name`` into the demo shape with matched active parameters."""
    from moesaic.moe.routing.base import ROUTERS

    k = ROUTERS.get(name).required_top_k
    sets = [f"model.moe.router={json.dumps({'kind': name})}"]
    if k is not None:
        sets += [f"model.moe.granularity={k}", "model.moe.top_k=1"]
    return sets


def _run_dir(out: Path, name: str, seed: int) -> Path:
    return out / f"{name}-seed{seed}"


def train_one(config: Path, name: str, seed: int, steps: int, out: Path) -> dict[str, Any]:
    """Train (or finish, or read back) one router and seed; the final record's numbers."""
    run = _run_dir(out, name, seed)
    metrics = run / "metrics.jsonl"
    done = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    if not (done and done[-1]["step"] >= steps and "val_loss" in done[-1]):
        cmd = [sys.executable, "-m", "moesaic", "train", str(config), "--out", str(run),
               "--set", f"train.max_steps={steps}", "--set", f"train.seed={seed}", "--set", "train.threads=1",
               "--set", "train.tensorboard=false", "--set", "train.progress=false", "--set", "train.log_every=10",
               "--set", f"train.eval_every={steps}", *[a for s in overrides(name) for a in ("--set", s)]]
        if (run / "LATEST").is_file():
            cmd.append("--resume")
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            return {"router": name, "seed": seed, "error": (res.stderr.strip().splitlines() or ["?"])[-1]}
        done = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    late = [r for r in done if r["step"] > steps // 2 and "routing" in r]
    imb = [statistics.mean(v["max_over_mean"] for v in r["routing"].values()) for r in late]
    k_eff = [statistics.mean(sum(v["load"]) for v in r["routing"].values()) for r in late if
             all("load" in v for v in r["routing"].values())]
    return {"router": name, "seed": seed, "val_loss": done[-1]["val_loss"],
            "max_over_mean": statistics.mean(imb) if imb else math.nan,
            "assignments_per_step": statistics.mean(k_eff) if k_eff else math.nan}


def throughput(config: Path, names: list[str], steps: int, threads: int) -> dict[str, float]:
    """Training tokens/s of every router, interleaved in one process (median step time)."""
    import tempfile

    import torch

    from moesaic.train.run_config import load_run_config
    from moesaic.train.trainer import Trainer

    torch.set_num_threads(threads)
    fns: dict[str, Callable[[], object]] = {}
    tokens: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            cfg = load_run_config(config, [*overrides(n), f"train.threads={threads}", "train.tensorboard=false"])
            t = Trainer(cfg, Path(tmp) / n, log=lambda _m: None)
            batch = t.loader.next_batch(t.tc.batch_size)
            tokens[n] = int(batch["input_ids"].numel())
            fns[n] = partial(t.train_step, batch)
        secs = time_interleaved(fns, repeats=steps, warmup=2)
    return {n: tokens[n] / s for n, s in secs.items()}


def table(rows: list[dict[str, Any]], tps: dict[str, float], tokens_per_step: int) -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["router"], []).append(r)
    lines = ["| router | val loss (mean ± sd) | seeds | max/mean load | experts/token | tokens/s |",
             "|---|---|---|---|---|---|"]
    ranked = sorted(by, key=lambda n: statistics.mean(r.get("val_loss", math.inf) for r in by[n]))
    for n in ranked:
        ok = [r for r in by[n] if "val_loss" in r]
        if not ok:
            lines.append(f"| {n} | failed: {by[n][0]['error']} | 0 | | | |")
            continue
        v = [r["val_loss"] for r in ok]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        kpt = statistics.mean(r["assignments_per_step"] for r in ok) / tokens_per_step
        imb = statistics.mean(r["max_over_mean"] for r in ok)
        lines.append(f"| {n} | {statistics.mean(v):.4f} ± {sd:.4f} | {len(v)} | {imb:.3f} | {kpt:.2f} | "
                     f"{tps.get(n, math.nan):,.0f} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: the config's max_steps)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--routers", default="", help="comma-separated names (default: every eligible router)")
    p.add_argument("--out", default="runs/router-leaderboard", help="one training folder per router and seed")
    p.add_argument("--timing-steps", type=int, default=10, help="interleaved steps per router for tokens/s")
    p.add_argument("--threads", type=int, default=0, help="threads for the tokens/s pass (default: all cores)")
    p.add_argument("--markdown", default="", help="write the table here")


def run(args: argparse.Namespace) -> int:
    import os

    from moesaic.core.errors import ConfigError
    from moesaic.train.run_config import load_run_config

    config = Path(args.config)
    cfg = load_run_config(config)
    steps = args.steps or cfg.train.max_steps
    elig = eligibility()
    names = [n for n in args.routers.split(",") if n] or [n for n, why in elig.items() if not why]
    for n in names:
        if n not in elig:
            raise ConfigError("--routers", n, f"unknown router; known: {', '.join(elig)}")
        if elig[n]:
            raise ConfigError("--routers", n, f"cannot enter the leaderboard: {elig[n]}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = Path(args.out)
    rows = []
    for seed in seeds:
        for n in names:
            rows.append(train_one(config, n, seed, steps, out))
            print(json.dumps(rows[-1]), flush=True)
    threads = args.threads or os.cpu_count() or 1
    tps = throughput(config, [n for n in names if any("val_loss" in r for r in rows if r["router"] == n)],
                     args.timing_steps, threads) if args.timing_steps else {}
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len  # type: ignore[attr-defined]  # all micro-batches
    md = table(rows, tps, tokens_per_step)
    excluded = ", ".join(f"{n} ({why})" for n, why in elig.items() if why)
    md += (f"\n\n{steps} steps, seeds {seeds}, tokens/s at {threads} threads interleaved in one process. "
           f"Not eligible: {excluded}.\n")
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md)
    (out / "leaderboard.json").write_text(json.dumps({"rows": rows, "tokens_per_s": tps}, indent=1))
    return 0
