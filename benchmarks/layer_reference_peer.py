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

The peer on our weights and the limit are those of ``moesaic bench layer`` (:func:`moesaic.bench.impls.peer_impls`,
:func:`~moesaic.bench.impls.floor_impls`), timed with its :func:`~moesaic.bench.measure.time_interleaved`
(shuffled order per round, one warm-up), gradients cleared before each call.

Also printed: the largest expert's share of the rows over the mean (routing imbalance) for each, and whether
the uninitialised block holds non-finite or zero-only parameters.

Usage: ``python benchmarks/layer_reference_peer.py [--threads N] [--cells T:E:k,...] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import torch

import moesaic
from moesaic.bench.impls import Impl, floor_impls, peer_impls
from moesaic.bench.measure import run_header, time_interleaved

D, FF = 512, 1024
PEER = "transformers Mixtral grouped_mm"


def fwd_bwd(impl: Impl, x_TD: torch.Tensor) -> None:
    """One timed call: forward, ``y.sum().backward()`` (as the reference script), gradients cleared first."""
    for p in impl.params:
        p.grad = None
    impl.run(x_TD.detach().requires_grad_()).sum().backward()


def imbalance(router_weight_ED: torch.Tensor, x_TD: torch.Tensor, k: int) -> float:
    """The busiest expert's row count over the mean, for top-k of ``x W^T``."""
    E = router_weight_ED.shape[0]
    with torch.no_grad():
        counts = torch.bincount((x_TD @ router_weight_ED.t()).topk(k, dim=-1).indices.flatten(), minlength=E)
    return float(counts.max() / counts.float().mean())


def cell(T: int, E: int, k: int, repeats: int) -> str:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    ours = moesaic.moe_layer(d_model=D, d_ff=FF, num_experts=E, top_k=k)
    cfg = MixtralConfig(hidden_size=D, intermediate_size=FF, num_local_experts=E, num_experts_per_tok=k,
                        router_jitter_noise=0.0)
    cfg._experts_implementation = "grouped_mm"
    bare = MixtralSparseMoeBlock(cfg)  # exactly as the reference script: no post_init
    (same,), _ = peer_impls(D, FF, E, k, {"mixtral": ours}, wanted=lambda name: name == PEER)  # our weights
    limit = floor_impls(D, FF, E, k, T)[0]
    impls = {"ours": Impl("ours", "mixtral", ours, list(ours.parameters())),
             "peer, as the reference builds it": Impl("bare", "mixtral", lambda x: bare(x.unsqueeze(0)).squeeze(0),
                                                      list(bare.parameters())),
             "peer, our weights": same, "limit": limit}
    x_TD = torch.randn(T, D)
    imb = {"ours": imbalance(ours.router.weight, x_TD, k),
           "peer, as the reference builds it": imbalance(bare.gate.weight, x_TD, k),
           "peer, our weights": imbalance(ours.router.weight, x_TD, k)}  # the same router weights, copied
    nonfinite = any(not bool(torch.isfinite(p).all()) for p in bare.parameters())
    zero_experts = bool((bare.experts.gate_up_proj == 0).all())
    s = time_interleaved({name: partial(fwd_bwd, i, x_TD) for name, i in impls.items()}, repeats)
    ms = {name: 1e3 * v for name, v in s.items()}
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
