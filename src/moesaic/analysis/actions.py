"""What to do about what the report shows: which experts to prune, how large an expert cache must be for a
target hit rate, and where to place experts on N ranks (ExFlow; :mod:`moesaic.distributed.placement`)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from moesaic.analysis.trace import DECODE, Trace
from moesaic.distributed.placement import affinity_counts, solve


def saliency(model: nn.Module, trace: Trace) -> tuple[dict[str, list[float]], str]:
    """Per layer, each expert's saliency on the scored passages: the sum over its assignments of router weight
    times expert-output norm (the measure of the ``prune`` verb, :mod:`moesaic.transforms.expert_select`), and
    "" or why it does not apply (experts that are not stacked FFNs, routers without weight rows)."""
    from moesaic.core.errors import ConversionError
    from moesaic.transforms.expert_select import expert_stats, moe_layers

    try:
        layers = moe_layers(model, None, "analyze")
    except ConversionError as e:
        return {}, str(e)
    device = next(model.parameters()).device

    def calibrate(m: nn.Module) -> None:
        for ids, mask in trace.batches:
            m(ids.to(device), attention_mask=mask.to(device))

    stats = expert_stats(model, layers, calibrate)
    return {n: s["saliency"].tolist() for n, s in stats.items()}, ""


def prune_list(layer_stats: dict[str, Any], fraction: float = 0.25,
               saliency_E: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """Never-used experts, and the ``fraction`` least used (by assignments) and least salient of each layer."""
    out = {}
    for name, s in layer_stats.items():
        load = np.asarray(s["load"])
        n = max(1, int(round(fraction * len(load))))
        out[name] = {"never_used": s["never_used"],
                     "least_used": [int(e) for e in np.argsort(load, kind="stable")[:n]],
                     "least_used_share": float(np.sort(load)[:n].sum() / max(load.sum(), 1))}
        sal = (saliency_E or {}).get(name)
        if sal is not None:
            v = np.asarray(sal)
            out[name]["saliency"] = v.tolist()
            out[name]["least_salient"] = [int(e) for e in np.argsort(v, kind="stable")[:n]]
            out[name]["least_salient_share"] = float(np.sort(v)[:n].sum() / max(v.sum(), 1e-30))
    return out


def decode_steps(trace: Trace) -> dict[str, list[list[int]]]:
    """Per layer, the expert sets of each decode step, in order (what an expert cache sees)."""
    rows = np.flatnonzero(trace.phase == DECODE)
    return {lt.name: [[int(e) for e in lt.ids_TK[r] if e >= 0] for r in rows] for lt in trace.layers}


def lru_hit_rate(steps: list[list[int]], size: int) -> float:
    """Hit rate of a least-recently-used cache of ``size`` experts over the steps (every lookup counts)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    for experts in steps:
        for e in experts:
            total += 1
            if e in cache:
                hits += 1
                cache.move_to_end(e)
            else:
                cache[e] = None
                if len(cache) > size:
                    cache.popitem(last=False)
    return hits / total if total else 0.0


def cache_size(trace: Trace, target: float = 0.9) -> dict[str, Any]:
    """Per layer, the hit rate of an LRU cache of every size on the recorded decode steps, and the smallest
    size reaching ``target`` (None when no decode steps were recorded)."""
    out: dict[str, Any] = {}
    for lt in trace.layers:
        steps = decode_steps(trace)[lt.name]
        if not steps:
            out[lt.name] = {"curve": [], "suggested": None}
            continue
        curve = [lru_hit_rate(steps, n) for n in range(1, lt.num_experts + 1)]
        ok = [n for n, h in enumerate(curve, start=1) if h >= target]
        out[lt.name] = {"curve": curve, "suggested": ok[0] if ok else lt.num_experts}
    return out


def placement(trace: Trace, ranks: int) -> dict[str, Any] | None:
    """ExFlow placement of every layer's experts on ``ranks`` ranks from the recorded affinity, with the
    cross-rank traffic of round-robin and of the chosen placement (None when it does not apply)."""
    E = {lt.num_experts for lt in trace.layers}
    if len(trace.layers) < 2 or len(E) != 1 or next(iter(E)) % ranks:
        return None
    num_experts = next(iter(E))
    counts = affinity_counts([torch.from_numpy(lt.ids_TK) for lt in trace.layers], num_experts)
    rank_of, scores = solve(counts, num_experts, ranks, method="heuristic")
    return {"ranks": ranks, "rank_of": {lt.name: r.tolist() for lt, r in zip(trace.layers, rank_of)},
            "traffic": {k: v for k, v in scores.items()}}
