"""Where the demo's MoE layer spends its time against the dense twin's FFN: forward + backward of each part
on the demo's batch (16 x 128 tokens), interleaved in one process, wall clock, medians.

Parts: the whole MoE layer; the dense twin's FFN (width 640, the same active parameters); the shared
experts alone (width 2 x 128); the routed experts alone on a fixed dispatch plan; the router's forward and
backward alone; the router and dispatch plan under ``no_grad``. The GEMM FLOPs of each part are printed
beside it, so a part's rate can be read against the dense FFN's.

Usage: ``python benchmarks/demo_layer_parts.py [configs/demo.yaml] [--threads N] [--repeats 40]``
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch

from moesaic.bench.measure import run_header, time_interleaved
from moesaic.examples.demo import dense_twin
from moesaic.train.run_config import load_run_config


def fwd_bwd(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y = y[0] if isinstance(y, tuple) else y
        assert isinstance(y, torch.Tensor)
        y.sum().backward()
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="configs/demo.yaml")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(run_header("wall", "median fwd+bwd ms per part, one layer"))
    cfg = load_run_config(args.config, ["model.vocab_size=1024"])
    torch.manual_seed(0)
    moe_model, dense_model = cfg.model.build(), dense_twin(cfg).model.build()
    layer = next(m for m in moe_model.modules() if type(m).__name__ == "MoELayer")
    dense_ffn = next(m for m in dense_model.modules() if type(m).__name__ == "DenseFFN")
    T, D = cfg.train.batch_size * cfg.data.seq_len, layer.d_model
    x = torch.randn(T, D)
    with torch.no_grad():
        plan = layer.dispatcher.plan(layer.router(x))

    def plan_only() -> None:
        with torch.no_grad():
            layer.dispatcher.plan(layer.router(x))

    k, F = layer.top_k, layer.cfg.expert_d_ff
    gemm = {  # forward + backward GEMM FLOPs (3 x the forward's), gated FFNs
        "dense twin FFN": 3 * 2 * T * D * dense_ffn.down_proj.in_features * 3,
        "shared experts": 3 * 2 * T * D * layer.shared_experts.down_proj.in_features * 3,
        "routed experts (fixed plan)": 3 * 2 * T * k * D * F * 3,
    }
    parts: dict[str, Callable[[], None]] = {
        "MoE layer": fwd_bwd(layer, x),
        "dense twin FFN": fwd_bwd(dense_ffn, x),
        "shared experts": fwd_bwd(layer.shared_experts, x),
        "routed experts (fixed plan)": fwd_bwd(lambda xi: layer.experts(xi, plan), x),
        "router fwd+bwd": fwd_bwd(lambda xi: layer.router(xi).weight_N, x),
        "router + plan, no_grad": plan_only,
    }
    times = time_interleaved(parts, args.repeats, warmup=5)
    print(f"{args.config}: T={T} tokens, d_model={D}, threads={args.threads}")
    for name, s in times.items():
        ms = s * 1e3
        rate = f"  ({gemm[name] / ms / 1e6:.0f} GFLOP/s of GEMM work)" if name in gemm else ""
        print(f"{name:30s} {ms:7.2f} ms{rate}")


if __name__ == "__main__":
    main()
