"""Per-layer expert counts: lists, or MoLA's named allocations mapped onto any depth by layer quarters.

MoLA (Gao et al. 2024, "Higher Layers Need More LoRA Experts") splits 32 layers into four groups of 8 and
gives them 2-4-6-8 experts (increasing, its best), 8-6-4-2 (decreasing), more at both ends than in the
middle (hourglass) or 5-5-5-5 (uniform). Here the quarter weights are 1:2:3:4, 4:3:2:1, 2:1:1:2 and 1:1:1:1 of a
total held at ``average * depth``: each layer gets ``average * w(quarter) / mean_w``, rounded by largest
remainder to integers >= ``floor`` that sum to the total exactly.
"""

from __future__ import annotations

import math

from moesaic.core.config import require

QUARTER_WEIGHTS: dict[str, tuple[float, float, float, float]] = {
    "uniform": (1, 1, 1, 1), "increasing": (1, 2, 3, 4), "decreasing": (4, 3, 2, 1), "hourglass": (2, 1, 1, 2)}


def quarter(layer: int, depth: int) -> int:
    """The quarter (0..3) of ``layer`` in a stack of ``depth`` layers."""
    return min(3, (4 * layer) // depth)


def allocate(kind: str, average: int, depth: int, floor: int = 1, path: str = "peft.allocation") -> list[int]:
    """Expert counts per layer for allocation ``kind``, summing to ``average * depth``, each >= ``floor``."""
    total = average * depth
    require(floor * depth <= total, path, kind,
            f"needs at least {floor} experts (top_k) in each of {depth} layers but the total is {total}")
    w = [QUARTER_WEIGHTS[kind][quarter(i, depth)] for i in range(depth)]
    mean_w = sum(w) / depth
    raw = [max(float(floor), average * x / mean_w) for x in w]
    scale = (total - floor * depth) / max(sum(r - floor for r in raw), 1e-12)
    raw = [floor + (r - floor) * scale for r in raw]
    out = [math.floor(r) for r in raw]
    order = sorted(range(depth), key=lambda i: (-(raw[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    if kind in ("increasing", "decreasing"):  # a quarter's odd unit goes to its deeper (shallower) layers
        out.sort(reverse=kind == "decreasing")
    return out


def per_layer(value: int | list[int], depth: int, path: str) -> list[int]:
    """One int for every layer, or a list with one entry per layer."""
    if isinstance(value, int):
        return [value] * depth
    require(len(value) == depth, path, value, f"needs one entry per targeted layer ({depth})")
    return list(value)
