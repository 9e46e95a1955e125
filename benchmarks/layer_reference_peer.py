"""The layer reference protocol (`layer_vs_transformers.py` in the shared bench folder) with its peer built two
ways, side by side: as that script builds it, and on the same weights as ours.

That script constructs ``MixtralSparseMoeBlock(cfg)`` directly. transformers 5 allocates a module's parameters
with ``torch.empty`` and initialises them only in ``PreTrainedModel.post_init``, which a bare block never
runs, so the peer computes on whatever memory it got: its router routes with garbage logits (a few experts
take most tokens, some none) and its experts multiply zeros or leftovers. On a CPU, fewer and larger GEMMs
are faster than many small ones, so the peer's time there is not the time of the same layer on real weights.

Per cell, interleaved in one process, wall clock, fwd + bwd with ``y.sum().backward()``, medians:

* ``ours``: ``moesaic.moe_layer`` (its default backend);
* ``peer, as the reference builds it``: the bare block, uninitialised;
* ``peer, our weights``: the same block with our router and expert weights copied in (same routing as ours);
* ``limit``: one dense SwiGLU FFN over the T*k routed rows (zero routing and dispatch cost).

Also printed: the largest expert's share of the rows over the mean (routing imbalance) for each, and whether
the uninitialised block holds non-finite or zero-only parameters.

Usage: ``python benchmarks/layer_reference_peer.py [--threads N] [--cells T:E:k,...] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import moesaic
from moesaic.bench.impls import _copy_into_hf
from moesaic.bench.measure import run_header

D, FF = 512, 1024


def cell(T: int, E: int, k: int, repeats: int) -> str:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    ours = moesaic.moe_layer(d_model=D, d_ff=FF, num_experts=E, top_k=k)
    cfg = MixtralConfig(hidden_size=D, intermediate_size=FF, num_local_experts=E, num_experts_per_tok=k,
                        router_jitter_noise=0.0)
    cfg._experts_implementation = "grouped_mm"
    peer_ref = MixtralSparseMoeBlock(cfg)  # exactly as the reference script: no post_init
    nonfinite = any(not bool(torch.isfinite(p).all()) for p in peer_ref.parameters())
    zero_experts = bool((peer_ref.experts.gate_up_proj == 0).all())
    peer_same = MixtralSparseMoeBlock(cfg)
    _copy_into_hf(peer_same, ours)
    x = torch.randn(T, D)
    xk = torch.randn(T * k, D)
    w1 = (torch.randn(2 * FF, D) * 0.02).requires_grad_()
    w2 = (torch.randn(D, FF) * 0.02).requires_grad_()

    def imbalance(logits_TE: torch.Tensor) -> float:
        counts = torch.bincount(logits_TE.topk(k, dim=-1).indices.flatten(), minlength=E).float()
        return float(counts.max() / counts.mean())

    with torch.no_grad():
        imb = {"ours": imbalance(x @ ours.router.weight.t()), "peer, as the reference builds it":
               imbalance(x @ peer_ref.gate.weight.t()), "peer, our weights": imbalance(x @ peer_same.gate.weight.t())}

    def block(m: torch.nn.Module, unsqueeze: bool) -> Callable[[], None]:
        def run() -> None:
            xi = (x.clone().unsqueeze(0) if unsqueeze else x.clone()).requires_grad_()
            y = m(xi)
            y = y[0] if isinstance(y, tuple) else y
            y.sum().backward()
        return run

    def limit() -> None:
        xi = xk.clone().requires_grad_()
        g, u = F.linear(xi, w1).chunk(2, dim=-1)
        F.linear(F.silu(g) * u, w2).sum().backward()

    fns = {"ours": block(ours, False), "peer, as the reference builds it": block(peer_ref, True),
           "peer, our weights": block(peer_same, True), "limit": limit}
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    parts = [f"{name} {ms[name]:.0f} ms" + (f" (imbalance {imb[name]:.2f})" if name in imb else "") for name in ms]
    ratios = (f"peer(reference build)/ours {ms['peer, as the reference builds it'] / ms['ours']:.2f}, "
              f"peer(our weights)/ours {ms['peer, our weights'] / ms['ours']:.2f}, "
              f"peer(our weights)/limit {ms['peer, our weights'] / ms['limit']:.2f}")
    return (f"T={T} E={E} k={k} threads={torch.get_num_threads()}: " + "; ".join(parts) + f" | {ratios}"
            + f" | uninitialised block: non-finite {nonfinite}, all-zero experts {zero_experts}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cells", default="2048:8:2,2048:32:2,2048:64:8,8192:8:2,8192:32:2,8192:64:8")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(run_header("wall", "median fwd+bwd per implementation"), flush=True)
    for c in args.cells.split(","):
        T, E, k = (int(v) for v in c.split(":"))
        print(cell(T, E, k, args.repeats), flush=True)


if __name__ == "__main__":
    main()
