"""The report's figures (matplotlib, PNG): each function takes ``stats.json``-shaped numbers and returns
a figure; :func:`save` writes it and closes it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

MAX_PANELS = 8


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def _grid(n: int, size: float = 3.0) -> tuple[Figure, list[Any]]:
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    flat = list(axes.reshape(-1))
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _pick(names: list[str]) -> list[str]:
    """At most MAX_PANELS layers, spread over the depth (first and last included)."""
    if len(names) <= MAX_PANELS:
        return names
    idx = np.linspace(0, len(names) - 1, MAX_PANELS).round().astype(int)
    return [names[i] for i in sorted(set(idx.tolist()))]


def load_heatmap(layers: dict[str, Any], title: str = "expert load / mean load", diff: bool = False) -> Figure:
    """Layers x experts: each expert's load over the layer's mean (or, ``diff``, a difference of shares)."""
    names = list(layers)
    E = max(len(layers[n]["load"]) for n in names)
    M = np.full((len(names), E), np.nan)
    for i, n in enumerate(names):
        v = np.asarray(layers[n]["load"], dtype=float)
        M[i, :len(v)] = v if diff else v / max(v.mean(), 1e-12)
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.25 * E), 1 + 0.35 * len(names)))
    lim = np.nanmax(np.abs(M)) if diff else None
    im = ax.imshow(M, aspect="auto", cmap="coolwarm" if diff else "viridis",
                   vmin=-lim if diff and lim else None, vmax=lim if diff and lim else None)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return fig


def imbalance_bars(layers: dict[str, Any]) -> Figure:
    names = list(layers)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(names)), 3))
    ax.bar(x - 0.2, [layers[n]["max_over_mean"] for n in names], 0.4, label="max / mean")
    ax.bar(x + 0.2, [layers[n]["cv"] for n in names], 0.4, label="CV")
    ax.set_xticks(x, [str(i) for i in range(len(names))])
    ax.set_xlabel("MoE layer")
    ax.legend()
    ax.set_title("load imbalance per layer")
    return fig


def matrices(mats: dict[str, np.ndarray], title: str, xlabel: str, ylabel: str, cmap: str = "magma") -> Figure:
    """One heatmap per entry (at most MAX_PANELS, spread over the depth)."""
    keys = _pick(list(mats))
    fig, axes = _grid(len(keys))
    for ax, k in zip(axes, keys):
        m = mats[k]
        lim = float(np.abs(m).max()) if cmap == "coolwarm" and m.size else None
        im = ax.imshow(m, cmap=cmap, vmin=-lim if lim else None, vmax=lim)
        ax.set_title(k, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    return fig


def coactivation(layers: dict[str, Any]) -> Figure:
    """Co-activation normalised as ``C[i, j] / sqrt(C[i, i] C[j, j])`` (1 on the diagonal of used experts)."""
    mats = {}
    for n, s in layers.items():
        C = np.asarray(s["coactivation"], dtype=float)
        d = np.sqrt(np.diag(C))
        mats[n] = np.divide(C, np.outer(d, d), out=np.zeros_like(C), where=np.outer(d, d) > 0)
    return matrices(mats, "co-activation within a layer (normalised)", "expert", "expert")


def affinity(aff: list[dict[str, Any]]) -> Figure:
    mats = {f"{a['from']} -> {a['to']}": np.asarray(a["conditional"]) for a in aff}
    return matrices(mats, "inter-layer affinity P(j at l+1 | i at l) (ExFlow)", "expert at l+1", "expert at l",
                    cmap="viridis")


def confidence(layers: dict[str, Any], trace_conf: dict[str, np.ndarray]) -> Figure:
    fig, ax = plt.subplots(figsize=(5, 3))
    for n in _pick(list(trace_conf)):
        v = trace_conf[n][:, 0]
        v = v[~np.isnan(v)]
        if v.size:
            ax.hist(v, bins=30, range=(0, 1), histtype="step", label=n)
    ax.set_xlabel("top-1 router probability")
    ax.set_ylabel("tokens")
    ax.set_title("router confidence")
    ax.legend(fontsize=6)
    return fig


def phases(layers: dict[str, Any]) -> Figure:
    keys = _pick(list(layers))
    fig, axes = _grid(len(keys))
    for ax, n in zip(axes, keys):
        for ph, off in (("prefill", -0.2), ("decode", 0.2)):
            v = np.asarray(layers[n]["load_by_phase"][ph], dtype=float)
            share = v / v.sum() if v.sum() else v
            ax.bar(np.arange(len(v)) + off, share, 0.4, label=ph)
        ax.set_title(n, fontsize=8)
        ax.set_xlabel("expert", fontsize=7)
        ax.legend(fontsize=6)
    fig.suptitle("share of assignments: prefill vs decode")
    return fig


def specialisation(layers: dict[str, Any], key: str) -> Figure:
    """For the layer where ``key`` tells most about the expert: ``P(expert | label) / P(expert)``."""
    best = max(layers, key=lambda n: layers[n]["specialisation"].get(key, {}).get("mutual_information_bits", -1))
    s = layers[best]["specialisation"][key]
    P = np.asarray(s["p_expert_given_label"], dtype=float)
    load = np.asarray(layers[best]["load"], dtype=float)
    base = load / load.sum() if load.sum() else load
    lift = np.divide(P, base[None], out=np.zeros_like(P), where=base[None] > 0)
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.25 * len(base)), 1 + 0.3 * len(s["labels"])))
    im = ax.imshow(lift, aspect="auto", cmap="coolwarm", vmin=0, vmax=max(2.0, float(lift.max())))
    ax.set_yticks(range(len(s["labels"])), [str(x)[:28] for x in s["labels"]], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title(f"{key}: P(expert | {key}) / P(expert), {best} (MI {s['mutual_information_bits']:.3f} bits)")
    fig.colorbar(im, ax=ax)
    return fig


def mutual_information(layers: dict[str, Any]) -> Figure:
    keys = sorted({k for s in layers.values() for k in s["specialisation"]})
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(layers)), 3))
    for k in keys:
        ax.plot(range(len(layers)), [s["specialisation"].get(k, {}).get("mutual_information_bits", np.nan)
                                     for s in layers.values()], marker="o", label=k)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("I(label; expert) [bits]")
    ax.set_title("specialisation by metadata")
    ax.legend()
    return fig


def roofline(cost: dict[str, dict[str, float]], peaks: dict[str, float]) -> Figure:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    oi = np.logspace(-2, 3, 200)
    ax.loglog(oi, np.minimum(peaks["peak_flops"], oi * peaks["bandwidth_bytes"]) / 1e9, "k-", label="roofline")
    for n, c in cost.items():
        ax.loglog(c["intensity"], c["achieved_flops"] / 1e9, "o", label=n)
    ax.set_xlabel("operational intensity [FLOP / byte]")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"MoE layers vs this machine ({int(peaks['threads'])} threads)")
    ax.legend(fontsize=6)
    return fig
