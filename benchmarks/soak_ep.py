"""Hang soak for expert parallelism (docs/benchmarks.md, Expert-parallel hang soak): 500 steps with adversarial
random loads.

Every step draws expert loads from Dirichlet(0.1) (the same vector on every rank; tokens drawn per rank),
so many experts get zero tokens and a few get almost all, and ~30% of the ranks have zero valid tokens
(the rest a random count). The gloo process groups have the 60 s timeout, so a hang fails the run.

Usage: ``python benchmarks/soak_ep.py [--steps 500] [--sizes 2 4]``. Prints one line per EP size and
exits non-zero unless every size finished with 0 NaN and no timeout.
"""

from __future__ import annotations

import argparse
import sys
import time

from moesaic.distributed.launch import spawn
from moesaic.train.ep_equivalence import Case, ep_worker


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args(argv)
    ok = True
    for W in args.sizes:
        case = Case(dtype="float32", steps=args.steps, random_loads=True, record_grads=False,
                    router={"expert_bias": True, "bias_update_rate": 0.01, "z_loss_coef": 1e-3})
        t0 = time.perf_counter()
        try:
            res = spawn(ep_worker, W, {(W, "soak"): case})
        except Exception as e:  # noqa: BLE001 - a timeout or a crash on any rank
            print(f"EP={W}: FAILED after {time.perf_counter() - t0:.1f}s: {type(e).__name__}: {e}")
            ok = False
            continue
        dt = time.perf_counter() - t0
        soak = [r[W, "soak"] for r in res]
        steps = len(soak[0]["loss"])
        nan = sum(s["nonfinite"] for s in soak)
        zero_expert_steps = sum(int((c == 0).any()) for s in soak for c in s["counts"])
        empty_rank_steps = sum(int(c.sum() == 0) for s in soak for c in s["counts"])
        print(f"EP={W}: {steps} steps in {dt:.1f}s, hangs 0, timeouts 0, NaN {nan}; rank-steps with an idle "
              f"local expert {zero_expert_steps}/{steps * W}, rank-steps receiving no rows {empty_rank_steps}")
        ok = ok and nan == 0 and steps == args.steps
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
