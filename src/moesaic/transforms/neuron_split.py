"""Balanced partitions of FFN neurons: balanced k-means of key vectors, and a co-activation graph split.

MoEfication (Zhang et al. 2022) splits an FFN's neurons into equal-sized groups either by parameter
clustering (balanced k-means of the normalised key vectors, the rows of ``W_in``) or by a co-activation
graph (neurons that fire together belong together). Both use scipy: ``scipy.cluster.vq.kmeans2`` for the
centres and ``scipy.optimize.linear_sum_assignment`` for the balanced assignment (every centre repeated
``F / E`` times, so each group gets exactly ``F / E`` neurons at minimum total squared distance); the graph
split embeds the neurons with the eigenvectors of the normalised graph Laplacian (spectral clustering,
``scipy.sparse.csgraph.laplacian`` and ``scipy.linalg.eigh``) and balances that embedding the same way.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from moesaic.core.errors import ConfigError


def _check_divisible(F: int, E: int, field: str) -> None:
    if E < 1 or F % E != 0:
        raise ConfigError(field, E, f"the FFN width {F} must be divisible by the expert count")


def balanced_assign(points_FK: np.ndarray, centres_EK: np.ndarray) -> np.ndarray:
    """Labels ``[F]`` giving every centre exactly ``F / E`` points at minimum total squared distance."""
    from scipy.optimize import linear_sum_assignment

    F, E = points_FK.shape[0], centres_EK.shape[0]
    d_FE = ((points_FK[:, None, :] - centres_EK[None, :, :]) ** 2).sum(-1)
    cost_FF = np.repeat(d_FE, F // E, axis=1)  # slot j belongs to centre j // (F / E)
    rows, cols = linear_sum_assignment(cost_FF)
    labels = np.empty(F, dtype=np.int64)
    labels[rows] = cols // (F // E)
    return labels


def balanced_kmeans(points_FK: np.ndarray, num_groups: int, seed: int = 0, iters: int = 5) -> np.ndarray:
    """Balanced k-means: scipy's k-means for initial centres, then alternate the balanced assignment and
    the centre update ``iters`` times. Returns labels ``[F]`` with every group of size ``F / E``."""
    from scipy.cluster.vq import kmeans2

    F = points_FK.shape[0]
    _check_divisible(F, num_groups, "num_experts")
    pts = np.asarray(points_FK, dtype=np.float64)
    centres, _ = kmeans2(pts, num_groups, minit="++", seed=seed)
    labels = balanced_assign(pts, centres)
    for _ in range(iters):
        centres = np.stack([pts[labels == e].mean(0) for e in range(num_groups)])
        new = balanced_assign(pts, centres)
        if np.array_equal(new, labels):
            break
        labels = new
    return labels


def key_vectors(w_in_FD: Tensor) -> np.ndarray:
    """The rows of ``W_in`` (the keys), L2-normalised, as float64 numpy ``[F, D]``."""
    w = w_in_FD.detach().double()
    return (w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy()


def coactivation_split(active_NF: Tensor, num_groups: int, seed: int = 0) -> np.ndarray:
    """Group neurons that are active together: affinity ``A_ij`` = co-activation counts over N tokens
    (``active_NF`` boolean or non-negative), spectral embedding from the normalised Laplacian's smallest
    eigenvectors, then balanced k-means of the row-normalised embedding."""
    from scipy.linalg import eigh
    from scipy.sparse.csgraph import laplacian

    F = active_NF.shape[1]
    _check_divisible(F, num_groups, "num_experts")
    a = active_NF.detach().double()
    A_FF = (a.t() @ a).cpu().numpy()
    np.fill_diagonal(A_FF, 0.0)
    L_FF = np.asarray(laplacian(A_FF, normed=True), dtype=np.float64)
    dims = min(max(num_groups, 2), F - 1)
    _, vecs = eigh(L_FF, subset_by_index=[0, dims - 1])
    emb = vecs / np.linalg.norm(vecs, axis=1, keepdims=True).clip(1e-12)
    return balanced_kmeans(emb, num_groups, seed=seed)
