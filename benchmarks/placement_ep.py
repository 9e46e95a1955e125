"""Affinity-aware expert placement (ExFlow) on a trained model's routing traces.

Records every MoE layer's routing on calibration data (training windows) and on held-out data (the
validation plays), fits placements on the calibration traces for each rank count G (the integer program
with a time limit, the assignment heuristic, round-robin; the best on calibration is kept), and reports
the cross-rank token traffic between consecutive MoE layers on the held-out traces before (round-robin,
the contiguous layout of expert parallelism) and after.

Usage: ``python benchmarks/placement_ep.py CHECKPOINT_DIR [--ranks 2 4 8] [--calib-batches 8]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import moesaic
from moesaic.analysis.recorder import RoutingRecorder
from moesaic.distributed import placement as P


def traces(model, batches) -> list[torch.Tensor]:
    with RoutingRecorder(model) as rec, torch.no_grad():
        for b in batches:
            model(b["input_ids"])
    return list(rec.topk_ids().values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("checkpoint")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=20.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = moesaic.load(args.checkpoint)
    data = model.run_config.data.build()
    loader = data.loader(seed=1234)
    calib = [loader.next_batch(args.batch_size) for _ in range(args.calib_batches)]
    held = data.eval_batches(args.batch_size)
    layers = moesaic.moe_layers(model)
    E = layers[0].num_experts
    fit_ids, held_ids = traces(model, calib), traces(model, held)
    N_fit, N_held = P.affinity_counts(fit_ids, E), P.affinity_counts(held_ids, E)
    T_fit, T_held = fit_ids[0].shape[0], held_ids[0].shape[0]
    strength = [float(P.conditional(N).max(1).mean()) for N in N_held]
    print(f"model {args.checkpoint}: {len(layers)} MoE layers, {E} experts, top-{layers[0].top_k}; "
          f"calibration {T_fit} tokens, held-out {T_held} tokens")
    print(f"affinity strength (mean_i max_j P(j|i), held-out) per layer pair: "
          f"{', '.join(f'{s:.3f}' for s in strength)} (uniform: {1 / E:.3f})")
    print(f"{'G':>3} | {'fit: rr':>8} {'heur':>8} {'milp':>8} {'chosen':>10} | {'held-out rr':>11} "
          f"{'placed':>8} {'reduction':>9} | {'s':>5}")
    for G in args.ranks:
        if E % G:
            continue
        t0 = time.perf_counter()
        pl, scores = P.solve(N_fit, E, G, "milp", time_limit=args.time_limit)
        dt = time.perf_counter() - t0
        rr = P.traffic(P.round_robin(len(layers), E, G), N_held)
        after = P.traffic(pl, N_held)
        pairs = T_held * (len(layers) - 1)
        print(f"{G:>3} | {scores['round_robin'] / (T_fit * (len(layers) - 1)):>8.3f} "
              f"{scores['heuristic'] / (T_fit * (len(layers) - 1)):>8.3f} "
              f"{scores.get('milp', float('nan')) / (T_fit * (len(layers) - 1)):>8.3f} {scores['chosen']:>10} | "
              f"{rr / pairs:>11.3f} {after / pairs:>8.3f} {100 * (1 - after / rr):>8.1f}% | {dt:>5.1f}")
    print("traffic = fraction of (token, consecutive layer pair) mass that changes rank (top-k pairs weighted 1/k^2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
