"""Routing statistics of a :class:`~moesaic.analysis.trace.Trace`, as plain numbers (``stats.json``).

Per layer: expert load and its imbalance (max/mean, coefficient of variation, entropy of the shares),
drop rate, router confidence (top-1 probability and margin), co-activation of experts within the layer,
prefill vs decode load, top tokens per expert, and specialisation by each metadata label (the shares
``P(expert | label)`` and the mutual information between label and expert). Between consecutive layers:
ExFlow's inter-layer affinity ``P(expert j at l+1 | expert i at l)`` (Yao et al. 2024, arXiv 2401.08383).
Every number here has a brute-force twin in ``tests/analysis/test_stats.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from moesaic.analysis.trace import DECODE, PREFILL, LayerTrace, Trace
from moesaic.distributed.placement import affinity_counts, conditional


def load(ids_TK: np.ndarray, E: int) -> np.ndarray:
    """Assignments per expert ``[E]``."""
    flat = ids_TK.reshape(-1)
    return np.bincount(flat[flat >= 0], minlength=E).astype(np.int64)


def imbalance(counts_E: np.ndarray) -> dict[str, float]:
    """max/mean, coefficient of variation, entropy of the load shares (nats) and that entropy over log E."""
    total = counts_E.sum()
    if total == 0:
        return {"max_over_mean": 0.0, "cv": 0.0, "entropy": 0.0, "entropy_norm": 0.0}
    share = counts_E / total
    nz = share[share > 0]
    ent = float(-(nz * np.log(nz)).sum())
    mean = counts_E.mean()
    return {"max_over_mean": float(counts_E.max() / mean), "cv": float(counts_E.std() / mean),
            "entropy": ent, "entropy_norm": ent / float(np.log(len(counts_E))) if len(counts_E) > 1 else 1.0}


def multi_hot(ids_TK: np.ndarray, E: int) -> np.ndarray:
    """``[T, E]`` 0/1: which experts each token went to."""
    m = np.zeros((ids_TK.shape[0], E), dtype=np.int64)
    t, k = np.nonzero(ids_TK >= 0)
    m[t, ids_TK[t, k]] = 1
    return m


def coactivation(ids_TK: np.ndarray, E: int) -> np.ndarray:
    """``C[i, j]`` tokens routed to both i and j (``C[i, i]`` tokens routed to i)."""
    m = multi_hot(ids_TK, E)
    return m.T @ m


def mutual_information(labels_T: np.ndarray, ids_TK: np.ndarray, E: int) -> tuple[list[str], np.ndarray, float]:
    """Labels, ``P(expert | label)`` ``[L, E]`` over assignments, and the mutual information (bits) between
    the label and the expert of an assignment."""
    names = sorted(set(labels_T.tolist()))
    counts = np.zeros((len(names), E))
    index = {n: i for i, n in enumerate(names)}
    lab = np.array([index[x] for x in labels_T.tolist()], dtype=np.int64)
    t, k = np.nonzero(ids_TK >= 0)
    np.add.at(counts, (lab[t], ids_TK[t, k]), 1.0)
    total = counts.sum()
    if total == 0:
        return names, counts, 0.0
    joint = counts / total
    pl, pe = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    mi = float((joint[nz] * np.log2(joint[nz] / (pl @ pe)[nz])).sum())
    return names, conditional(counts), mi


def top_tokens(ids_TK: np.ndarray, tokens_T: np.ndarray, E: int, n: int = 8, min_count: int = 3
               ) -> list[list[tuple[int, int, float]]]:
    """Per expert, ``(token id, count, lift)`` of its ``n`` most frequent tokens with at least ``min_count``
    occurrences there, where lift = the token's share among the expert's tokens over its share overall."""
    overall = np.bincount(tokens_T, minlength=int(tokens_T.max()) + 1 if tokens_T.size else 1)
    m = multi_hot(ids_TK, E)
    out: list[list[tuple[int, int, float]]] = []
    for e in range(E):
        toks = tokens_T[m[:, e] == 1]
        if toks.size == 0:
            out.append([])
            continue
        c = np.bincount(toks, minlength=overall.size)
        order = np.argsort(-c, kind="stable")[:n]
        out.append([(int(v), int(c[v]), float((c[v] / toks.size) / (overall[v] / tokens_T.size)))
                    for v in order if c[v] >= min_count])
    return out


def layer_stats(lt: LayerTrace, trace: Trace, decode_token: Callable[[int], str] | None = None,
                max_labels: int = 12) -> dict[str, Any]:
    """Every statistic of one layer (JSON-ready)."""
    E = lt.num_experts
    counts = load(lt.ids_TK, E)
    assigned = int(counts.sum())
    conf = lt.conf_T2
    has_probs = conf.size > 0 and not np.isnan(conf[:, 0]).all()
    out: dict[str, Any] = {
        "num_experts": E, "top_k": lt.top_k, "tokens": int(lt.ids_TK.shape[0]), "assignments": assigned,
        "load": counts.tolist(), **imbalance(counts),
        "dropped": lt.dropped, "drop_rate": lt.dropped / (assigned + lt.dropped) if assigned + lt.dropped else 0.0,
        "never_used": [int(e) for e in np.flatnonzero(counts == 0)],
        "top1_prob_mean": float(np.nanmean(conf[:, 0])) if has_probs else None,
        "margin_mean": float(np.nanmean(conf[:, 1])) if has_probs else None,
        "coactivation": coactivation(lt.ids_TK, E).tolist(),
        "load_by_phase": {ph: load(lt.ids_TK[trace.phase == v], E).tolist()
                          for ph, v in (("prefill", PREFILL), ("decode", DECODE))},
    }
    tops = top_tokens(lt.ids_TK, trace.token_ids, E)
    out["top_tokens"] = [[{"id": i, "text": decode_token(i) if decode_token else str(i), "count": c, "lift": lift}
                          for i, c, lift in row] for row in tops]
    spec = {}
    for key, labels in trace.meta.items():
        names, cond, mi = mutual_information(labels, lt.ids_TK, E)
        if len(names) < 2:
            continue
        sizes = {n: int((labels == n).sum()) for n in names}
        shown = sorted(names, key=lambda n: -sizes[n])[:max_labels]
        spec[key] = {"mutual_information_bits": mi, "labels": shown,
                     "p_expert_given_label": [cond[names.index(n)].tolist() for n in shown],
                     "tokens": [sizes[n] for n in shown]}
    out["specialisation"] = spec
    return out


def trace_stats(trace: Trace, decode_token: Callable[[int], str] | None = None) -> dict[str, Any]:
    """``{"layers": {name: layer_stats}, "affinity": [...], "overall": {...}}`` for the whole trace."""
    layers = {lt.name: layer_stats(lt, trace, decode_token) for lt in trace.layers}
    aff = []
    for a, b in zip(trace.layers[:-1], trace.layers[1:]):
        if a.num_experts != b.num_experts:
            continue
        N = affinity_counts([torch.from_numpy(a.ids_TK), torch.from_numpy(b.ids_TK)], a.num_experts)[0]
        P = conditional(N)
        base = N.sum(0) / N.sum() if N.sum() else np.zeros(b.num_experts)
        aff.append({"from": a.name, "to": b.name, "counts": N.tolist(), "conditional": P.tolist(),
                    # how much better than chance the best next expert is predicted (ExFlow's premise)
                    "top1_conditional_mean": float(P.max(1)[N.sum(1) > 0].mean()) if N.sum() else 0.0,
                    "top1_marginal": float(base.max()) if N.sum() else 0.0})
    overall = {k: float(np.mean([s[k] for s in layers.values()])) for k in ("max_over_mean", "cv", "entropy_norm")}
    overall["tokens"] = int(trace.token_ids.size)
    overall["decode_tokens"] = int((trace.phase == DECODE).sum())
    return {"layers": layers, "affinity": aff, "overall": overall}
