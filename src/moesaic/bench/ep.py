"""ep: all-to-all bytes of expert parallelism per MoE layer, analytical model next to measured gloo times.

Model (per rank, per MoE layer, uniform routing): every token sends ``k`` rows of ``D`` elements to the
experts' ranks; a fraction ``(W-1)/W`` of them leaves the rank. Forward = dispatch + combine:
``2 * T * k * D * b * (W-1)/W`` bytes, plus the count exchange ``E * 8 * (W-1)/W``; the backward pass
moves the same token bytes again (gradients of both exchanges). The measurement runs the real
expert-parallel experts wrapper (sort plan, gather, counts, tokens, local plan, exchange back, combine)
around identity experts on ``W`` gloo processes on this machine, one thread each, and reports the median
time and the bytes actually sent.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import cast

import torch

TARGET = "ep"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def model_bytes(T: int, k: int, D: int, E: int, W: int, dtype: str) -> dict[str, float]:
    """Analytical all-to-all bytes per rank per layer (uniform routing)."""
    b = torch.finfo(DTYPES[dtype]).bits // 8
    off = (W - 1) / W
    tokens = T * k * D * b * off
    counts = E * 8 * off
    return {"dispatch": tokens + counts, "combine": tokens, "forward": 2 * tokens + counts,
            "forward_backward": 4 * tokens + counts}


def _worker(rank: int, world: int, T: int, k: int, D: int, E: int, dtype: str, reps: int) -> dict[str, float]:
    import torch.distributed as dist

    from moesaic.core.types import DispatchPlan, RoutingDecision
    from moesaic.distributed.ep_experts import ExpertParallelExperts, ExpertShard
    from moesaic.moe.dispatch.base import sort_plan
    from moesaic.moe.experts.base import Experts

    class Identity(torch.nn.Module):
        def forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
            return plan.combine(plan.gather(x_TD))

    L = E // world
    local = cast(Experts, Identity())  # the experts interface's forward is all the wrapper calls here
    experts = ExpertParallelExperts(local, E, dist.group.WORLD, ExpertShard(rank * L, L, E))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(T, D, generator=g).to(DTYPES[dtype])
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    dec = RoutingDecision.from_topk(ids, torch.full((T, k), 1.0 / k, dtype=x.dtype), E)
    mine = (ids // L == rank).sum().item()
    times = []
    for i in range(reps + 3):
        dist.barrier()
        t0 = time.perf_counter()
        experts(x, sort_plan(dec))
        if i >= 3:
            times.append(time.perf_counter() - t0)
    b = x.element_size()
    sent = (T * k - mine) * D * b
    return {"ms": 1e3 * statistics.median(times), "sent_bytes": 2 * sent + E * 8 * (world - 1) / world}


def measure(T: int, k: int, D: int, E: int, W: int, dtype: str, reps: int = 20) -> dict[str, float]:
    from moesaic.distributed.launch import spawn

    res = spawn(_worker, W, T, k, D, E, dtype, reps)
    return {"ms": max(r["ms"] for r in res), "sent_bytes": statistics.mean(r["sent_bytes"] for r in res)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 2048], help="tokens per rank (T)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--model-only", action="store_true", help="print the analytical model only (no processes)")


def run(args: argparse.Namespace) -> int:
    print(f"{'T':>6} {'k':>2} {'D':>5} {'E':>3} {'W':>2} {'dtype':>8} | {'model fwd KiB':>13} "
          f"{'model fwd+bwd KiB':>17} | {'sent fwd KiB':>12} {'gloo fwd ms':>11} {'MB/s':>7}")
    for W in args.world:
        for T in args.tokens:
            m = model_bytes(T, args.top_k, args.d_model, args.experts, W, args.dtype)
            row = (f"{T:>6} {args.top_k:>2} {args.d_model:>5} {args.experts:>3} {W:>2} {args.dtype:>8} | "
                   f"{m['forward'] / 1024:>13.1f} {m['forward_backward'] / 1024:>17.1f} | ")
            if args.model_only:
                print(row + f"{'-':>12} {'-':>11} {'-':>7}")
                continue
            got = measure(T, args.top_k, args.d_model, args.experts, W, args.dtype, args.reps)
            mbs = got["sent_bytes"] / 1e6 / (got["ms"] / 1e3)
            print(row + f"{got['sent_bytes'] / 1024:>12.1f} {got['ms']:>11.2f} {mbs:>7.1f}", flush=True)
    return 0
