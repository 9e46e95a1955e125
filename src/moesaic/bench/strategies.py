"""strategies: perplexity and greedy decode tokens/s of the MoE decoding strategies against the baseline.

On a checkpoint with its data (the demo: ``make demo`` or ``moesaic train configs/demo.yaml``): held-out
perplexity over the data's eval windows (full-sequence forward, as ``moesaic eval``), and batch-1 greedy
decode tokens/s (prompt = the first ``--prompt-len`` tokens of an eval window, ``--new-tokens`` new),
every configuration interleaved in one process (each applies its transform, decodes, and undoes it),
medians. Strategies: dynamic k (``set_top_k_``), SCMoE (``scmoe_``; perplexity with the plausibility cut
off, alpha = 0, since a target outside the cut has probability 0; tokens/s with the cut), LLM-Drop
(``drop_sublayers_``, ranked on training windows) and early exit (``EarlyExitLM``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

TARGET = "strategies"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--json", default=None)


Apply = Callable[[nn.Module], tuple[nn.Module, Callable[[], None]]]


def _configs(model: nn.Module, calib: list[dict[str, torch.Tensor]]) -> dict[str, tuple[Apply, Apply]]:
    """name -> (transform for perplexity, transform for decoding); each returns (model, undo)."""
    from moesaic.inference.dynamic_k import moe_layers_by_index, set_top_k_
    from moesaic.inference.early_exit import EarlyExitLM
    from moesaic.inference.llm_drop import drop_sublayers_, rank_sublayers
    from moesaic.inference.scmoe import scmoe_

    k0 = next(iter(moe_layers_by_index(model).values())).top_k
    scores = rank_sublayers(model, calib)
    out: dict[str, tuple[Apply, Apply]] = {}

    def keep(m: nn.Module) -> tuple[nn.Module, Callable[[], None]]:
        return m, lambda: None

    def top_k(k: int) -> Apply:
        def f(m: nn.Module) -> tuple[nn.Module, Callable[[], None]]:
            return m, set_top_k_(m, k).restore
        return f

    def sc(alpha: float, rank: int) -> Apply:
        def f(m: nn.Module) -> tuple[nn.Module, Callable[[], None]]:
            w = scmoe_(m, 0.5, alpha, rank)
            return w, lambda: None if w.unwrap() is None else None
        return f

    def drop(kind: Any, n: int) -> Apply:
        def f(m: nn.Module) -> tuple[nn.Module, Callable[[], None]]:
            return m, drop_sublayers_(m, n, kind=kind, scores=scores).restore
        return f

    def early(crit: Any, thr: float) -> Apply:
        def f(m: nn.Module) -> tuple[nn.Module, Callable[[], None]]:
            return EarlyExitLM(m, thr, crit), lambda: None
        return f

    out[f"baseline (k={k0})"] = (keep, keep)
    for k in sorted({1, max(1, k0 - 1), k0 + 1, 2 * k0} - {k0}):
        out[f"dynamic k={k}"] = (top_k(k), top_k(k))
    for rank in (2, k0 + 1):
        out[f"SCMoE beta=0.5 rank={rank}"] = (sc(0.0, rank), sc(0.1, rank))
    for kind, n in (("attn", 1), ("attn", 2), ("mlp", 1), ("both", 2)):
        out[f"LLM-Drop {kind} n={n}"] = (drop(kind, n), drop(kind, n))
    for crit, thr in (("confidence", 0.9), ("confidence", 0.5), ("similarity", 0.95)):
        out[f"early exit {crit}>={thr}"] = (early(crit, thr), early(crit, thr))
    return out


def run(args: argparse.Namespace) -> int:
    import moesaic
    from moesaic.bench.measure import time_interleaved
    from moesaic.train.task import evaluate, select_task

    torch.set_num_threads(args.threads)
    model: Any = moesaic.load(args.checkpoint).eval()
    cfg = model.run_config
    data = cfg.data.build()
    task = select_task(cfg, data)
    batches = data.eval_batches(8)
    loader = data.loader(seed=1234)
    calib = [{"input_ids": loader.next_batch(8)["input_ids"]} for _ in range(max(1, args.calib_windows // 8))]
    prompt = batches[0]["input_ids"][:1, :args.prompt_len]
    N = args.new_tokens
    configs = _configs(model, calib)
    rows: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for name, (for_ppl, _) in configs.items():
            lm, undo = for_ppl(model)
            m = evaluate(lm, task, batches)
            rows[name] = {"val_loss": m["val_loss"], "val_ppl": math.exp(m["val_loss"])}
            stats = getattr(lm, "exit_stats", None)
            if callable(stats):
                rows[name]["mean_exit_layer"] = stats(reset=True)["mean_exit_layer"]
            undo()

        def decode(apply: Apply) -> Callable[[], torch.Tensor]:
            def f() -> torch.Tensor:
                lm, undo = apply(model)
                try:
                    return moesaic.generate(lm, prompt, N)
                finally:
                    undo()
            return f

        t = time_interleaved({n: decode(d) for n, (_, d) in configs.items()}, args.repeats, warmup=1)
        base_out = decode(next(iter(configs.values()))[1])()
    base = next(iter(rows))
    for name in rows:
        rows[name]["tok_s"] = N / t[name]
    print(f"threads {torch.get_num_threads()}  load average {os.getloadavg()[0]:.2f}  prompt {args.prompt_len}  "
          f"new {N}  eval tokens {sum(int((b['labels'] != -100).sum()) for b in batches)}")
    print("| configuration | val ppl | vs baseline | decode tok/s | vs baseline |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        extra = f" (mean exit layer {r['mean_exit_layer']:.2f})" if "mean_exit_layer" in r else ""
        print(f"| {name}{extra} | {r['val_ppl']:.2f} | {r['val_ppl'] / rows[base]['val_ppl']:.3f}x | "
              f"{r['tok_s']:.1f} | {r['tok_s'] / rows[base]['tok_s']:.2f}x |")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"rows": rows, "baseline_tokens": base_out[0].tolist()}, f, indent=1)
        os.replace(tmp, args.json)
    return 0
