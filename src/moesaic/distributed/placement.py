"""Affinity-aware expert placement (ExFlow, Yao et al. 2024, arXiv 2401.08383).

Tokens that pick expert i at MoE layer l often pick a predictable expert j at layer l+1. If i and j live
on the same rank, the token does not cross ranks between the two layers (in context-coherent EP it simply
continues on that rank). We

1. measure ``N_l[i, j]`` from routing traces (:class:`moesaic.analysis.recorder.RoutingRecorder`): the
   tokens routed to i at layer l and j at layer l+1; with top-k routing every one of the ``k x k`` pairs
   counts ``1/k^2`` (so ``sum N_l`` = number of tokens);
2. choose ``rank_of[l][e]`` with ``E/G`` experts per rank per layer, maximising the co-located mass
   ``sum_l sum_{i,j} N_l[i,j] [rank_of[l][i] == rank_of[l+1][j]]``, either exactly with an integer program
   (``scipy.optimize.milp``/HiGHS: binaries ``x[l,e,g]``, linearised products ``y[l,i,j,g] <= x``;
   expert 0 of layer 0 pinned to rank 0 to break the rank-relabelling symmetry) or with the layer-by-layer
   assignment heuristic (``linear_sum_assignment`` on ``B[j, g] = sum_{i on g} N_l[i, j]``), refined by
   coordinate ascent (each layer re-placed optimally given both neighbours, until nothing changes);
3. **guard**: the result is compared with round-robin (``e -> e // (E/G)``, the contiguous layout of
   :func:`apply_expert_parallel_`) and the better one is returned, so a placement is never worse than
   round-robin on the traces it was fitted on;
4. report the cross-rank traffic ``sum_l sum_{i,j} N_l[i,j] [rank differs]`` before and after, on held-out
   traces.

:func:`permute_experts_` renumbers a model's experts so that a placement becomes the contiguous layout
(rank g owns slots ``[g*E/G, (g+1)*E/G)``); the function computed by the model does not change.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from moesaic.core.errors import ConfigError

Placement = list[np.ndarray]  # rank_of[l][e]


# ------------------------------------------------------------------------------------------ affinity
def affinity_counts(ids: list[Tensor], num_experts: int) -> list[np.ndarray]:
    """``N_l[i, j]`` for consecutive layers from per-layer ``[T, k]`` ids (-1 = none; same tokens)."""
    out = []
    for a, b in zip(ids[:-1], ids[1:]):
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"traces of consecutive layers cover {a.shape[0]} and {b.shape[0]} tokens")
        N = np.zeros((num_experts, num_experts))
        ka, kb = a.shape[1], b.shape[1]
        for p in range(ka):
            for q in range(kb):
                ok = (a[:, p] >= 0) & (b[:, q] >= 0)
                idx = (a[ok, p] * num_experts + b[ok, q]).numpy()
                N += np.bincount(idx, minlength=num_experts * num_experts).reshape(num_experts, num_experts)
        out.append(N / (ka * kb))
    return out


def conditional(N: np.ndarray) -> np.ndarray:
    """``P(j | i)`` = rows of N normalised (rows without tokens stay 0)."""
    s = N.sum(1, keepdims=True)
    return np.divide(N, s, out=np.zeros_like(N), where=s > 0)


# ------------------------------------------------------------------------------------------ placements
def round_robin(num_layers: int, num_experts: int, ranks: int) -> Placement:
    """The contiguous layout of expert parallelism: expert e on rank ``e // (E/G)``."""
    _check(num_experts, ranks)
    return [np.arange(num_experts) // (num_experts // ranks) for _ in range(num_layers)]


def _check(E: int, G: int) -> None:
    if G < 1 or E % G:
        raise ConfigError("ranks", G, f"must divide the number of experts ({E})")


def traffic(placement: Placement, counts: list[np.ndarray]) -> float:
    """Token mass that changes rank between consecutive layers."""
    total = 0.0
    for ly, N in enumerate(counts):
        same = placement[ly][:, None] == placement[ly + 1][None, :]
        total += float(N[~same].sum())
    return total


def heuristic(counts: list[np.ndarray], num_experts: int, ranks: int, first: np.ndarray | None = None) -> Placement:
    """Layer by layer: fix layer l, then assign layer l+1's experts to rank slots by maximum gain."""
    from scipy.optimize import linear_sum_assignment

    _check(num_experts, ranks)
    per = num_experts // ranks
    pl = [first if first is not None else np.arange(num_experts) // per]
    for N in counts:
        B = np.stack([N[pl[-1] == g].sum(0) for g in range(ranks)], 1)  # [E_next, G]
        rows, cols = linear_sum_assignment(np.repeat(B, per, axis=1), maximize=True)
        nxt = np.empty(num_experts, dtype=np.int64)
        nxt[rows] = cols // per
        pl.append(nxt)
    return pl


def refine(placement: Placement, counts: list[np.ndarray], ranks: int, sweeps: int = 10) -> Placement:
    """Coordinate ascent: re-place each layer optimally given both neighbours (an assignment problem with
    gain ``B[j, g]`` = mass from layer l-1's experts on g into j plus mass from j into layer l+1's experts
    on g), sweeping until no layer changes. The co-located mass never decreases."""
    from scipy.optimize import linear_sum_assignment

    pl = [p.copy() for p in placement]
    E = pl[0].shape[0]
    per = E // ranks
    for _ in range(sweeps):
        changed = False
        for ly in range(len(pl)):
            B = np.zeros((E, ranks))
            for g in range(ranks):
                if ly > 0:
                    B[:, g] += counts[ly - 1][pl[ly - 1] == g].sum(0)
                if ly < len(counts):
                    B[:, g] += counts[ly][:, pl[ly + 1] == g].sum(1)
            rows, cols = linear_sum_assignment(np.repeat(B, per, axis=1), maximize=True)
            new = np.empty(E, dtype=np.int64)
            new[rows] = cols // per
            if (B[np.arange(E), new].sum() > B[np.arange(E), pl[ly]].sum() + 1e-9):
                pl[ly], changed = new, True
        if not changed:
            break
    return pl


def milp(counts: list[np.ndarray], num_experts: int, ranks: int, time_limit: float = 10.0,
         return_status: bool = False) -> Placement | tuple[Placement | None, bool] | None:
    """The integer program (HiGHS via scipy): the optimum, or the best solution found in ``time_limit``
    (``return_status``: also whether it is proven optimal). None if no solution was found."""
    from scipy.optimize import Bounds, LinearConstraint
    from scipy.optimize import milp as _milp
    from scipy.sparse import lil_matrix

    _check(num_experts, ranks)
    L, E, G = len(counts) + 1, num_experts, ranks
    nx = L * E * G

    def xi(ly: int, e: int, g: int) -> int:
        return (ly * E + e) * G + g

    pairs = [(ly, i, j, g) for ly, N in enumerate(counts) for i in range(E) for j in range(E) if N[i, j] > 0
             for g in range(G)]
    ny = len(pairs)
    c = np.zeros(nx + ny)
    for n, (ly, i, j, _g) in enumerate(pairs):
        c[nx + n] = -counts[ly][i, j]
    A = lil_matrix((L * E + L * G + 2 * ny, nx + ny))
    lo: list[float] = []
    hi: list[float] = []
    r = 0
    for ly in range(L):
        for e in range(E):  # each expert on exactly one rank
            for g in range(G):
                A[r, xi(ly, e, g)] = 1
            lo.append(1)
            hi.append(1)
            r += 1
        for g in range(G):  # E/G experts per rank
            for e in range(E):
                A[r, xi(ly, e, g)] = 1
            lo.append(E // G)
            hi.append(E // G)
            r += 1
    for n, (ly, i, j, g) in enumerate(pairs):  # y <= x[ly,i,g], y <= x[ly+1,j,g]
        for col in (xi(ly, i, g), xi(ly + 1, j, g)):
            A[r, nx + n] = 1
            A[r, col] = -1
            lo.append(-np.inf)
            hi.append(0)
            r += 1
    lb, ub = np.zeros(nx + ny), np.ones(nx + ny)
    lb[xi(0, 0, 0)] = 1  # symmetry breaking: rank labels are interchangeable
    integrality = np.concatenate([np.ones(nx), np.zeros(ny)])
    res = _milp(c, constraints=LinearConstraint(A.tocsr(), lo, hi), integrality=integrality,
                bounds=Bounds(lb, ub), options={"time_limit": time_limit, "disp": False})
    if res.x is None:
        return (None, False) if return_status else None
    x = res.x[:nx].reshape(L, E, G)
    pl = [x[ly].argmax(1).astype(np.int64) for ly in range(L)]
    return (pl, res.status == 0) if return_status else pl


def solve(counts: list[np.ndarray], num_experts: int, ranks: int, method: str = "milp",
          time_limit: float = 10.0) -> tuple[Placement, dict[str, float]]:
    """The best of round-robin, the heuristic and (``method="milp"``) the integer program within
    ``time_limit`` on ``counts``; returns it and the traffic of each candidate."""
    L = len(counts) + 1
    cands = {"round_robin": round_robin(L, num_experts, ranks),
             "heuristic": refine(heuristic(counts, num_experts, ranks), counts, ranks)}
    if method == "milp":
        p = milp(counts, num_experts, ranks, time_limit)
        if isinstance(p, list):
            cands["milp"] = p
    scores = {k: traffic(p, counts) for k, p in cands.items()}
    best = min(scores, key=lambda k: (scores[k], k != "round_robin"))  # ties keep round-robin
    return cands[best], {**scores, "chosen": best}  # type: ignore[dict-item]


# ------------------------------------------------------------------------------------ applying a placement
def expert_order(rank_of: np.ndarray) -> np.ndarray:
    """New slot -> old expert: experts of rank 0 first (in their old order), then rank 1, ..."""
    return np.argsort(rank_of, kind="stable")


@torch.no_grad()
def permute_experts_(layer: nn.Module, order: np.ndarray) -> None:
    """Renumber one MoE layer's experts: new expert s is old expert ``order[s]``. Permutes the router's
    per-expert rows (weight, aux-loss-free bias, loads: every parameter or buffer with ``E`` rows) and the
    stacked expert weights. Top-k ties may resolve differently (ties prefer the lower index)."""
    E = int(cast(int, layer.num_experts))
    idx = torch.as_tensor(order, dtype=torch.long)
    if sorted(order.tolist()) != list(range(E)):
        raise ValueError("order must be a permutation of the experts")
    for mod in (layer.get_submodule("router"), layer.get_submodule("experts")):
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if t.dim() >= 1 and t.shape[0] == E:
                t.copy_(t[idx.to(t.device)])
