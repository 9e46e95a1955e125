"""Batch-statistic aux losses as functions of additive statistics, and their exact shares of a split batch.

A balance loss such as Switch's ``E * sum_e f_e P_e`` is not a mean over tokens: its value on a batch is
not the token-weighted mean of its values on the parts of the batch (micro-batches of gradient
accumulation, ranks of data/expert parallelism). It is, however, a function ``L(S)`` of statistics that
*add* over the parts: ``S = sum_m S_m`` (expert counts, sums of router probabilities or gates, token and
sequence counts). A router declares each such loss as an :class:`AuxStat` (``stats`` thunk + ``fn``) in
``RoutingDecision.aux_stats``; given the batch totals ``S`` (a no-grad pre-pass, an all-reduce, or both;
:mod:`moesaic.train.global_aux`), part ``m`` contributes the share

    share_m = w_m L(S) + g . (S_m - w_m S),    g = dL/dS at S (no grad),    sum_m w_m = 1

linearised in the statistics that carry a gradient (the no-grad ones, such as the counts behind ``f``,
enter through ``L(S)`` only). The shares' values sum to ``L(S)`` and their gradients to
``g . sum_m dS_m = dL(S)``: exactly the loss and gradient of the whole batch. For a loss linear in its
gradient statistics (Switch: ``P_e = psum_e / T``) the share is the familiar
``E * sum_e f_e(S) * psum_m_e / T``; for nonlinear ones (CV^2 of the importance, Shazeer et al. 2017) it
is the first-order term around the batch value. We use ``w_m = t_m / T`` (routed tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from moesaic.moe.routing import losses


@dataclasses.dataclass(frozen=True)
class AuxStat:
    """``loss = fn(stats())``; every entry of ``stats()`` adds over disjoint parts of a batch.

    ``stats`` is a thunk so routers pay nothing unless a split batch needs it; it is called in the same
    forward (the statistics keep their autograd graph).
    """

    stats: Callable[[], dict[str, Tensor]]
    fn: Callable[[dict[str, Tensor]], Tensor]

    def value(self) -> Tensor:
        return self.fn(self.stats())


def _num(n: int, like: Tensor) -> Tensor:
    return torch.tensor(float(n), dtype=like.dtype, device=like.device)


def _counts(counts_E: Tensor, like: Tensor) -> Tensor:
    return counts_E.detach().to(like.dtype)


def switch(probs_TE: Tensor, counts_E: Tensor, scale_by_assignments: bool = False) -> AuxStat:
    """:func:`losses.switch_balance` ``E * sum_e f_e P_e``; ``scale_by_assignments`` multiplies by
    assignments per token (top-p's ``balance_normalization: tokens``)."""
    E = probs_TE.shape[1]

    def fn(s: dict[str, Tensor]) -> Tensor:
        c, T = s["counts_E"], s["T"].clamp_min(1)
        out = E * (c / c.sum().clamp_min(1) * s["psum_E"] / T).sum()
        return out * (c.sum() / T) if scale_by_assignments else out

    return AuxStat(lambda: {"counts_E": _counts(counts_E, probs_TE), "psum_E": probs_TE.sum(0),
                            "T": _num(probs_TE.shape[0], probs_TE)}, fn)


def device(probs_TE: Tensor, counts_E: Tensor, num_groups: int) -> AuxStat:
    """:func:`losses.device_balance` (DeepSeekMoE device level)."""
    E = probs_TE.shape[1]

    def fn(s: dict[str, Tensor]) -> Tensor:
        c, T = s["counts_E"], s["T"].clamp_min(1)
        f_G = (E * c / c.sum().clamp_min(1)).view(num_groups, -1).mean(1)
        return (f_G * (s["psum_E"] / T).view(num_groups, -1).sum(1)).sum()

    return AuxStat(lambda: {"counts_E": _counts(counts_E, probs_TE), "psum_E": probs_TE.sum(0),
                            "T": _num(probs_TE.shape[0], probs_TE)}, fn)


def sequence(scores_TE: Tensor, ids_TK: Tensor, seq_ids_T: Tensor) -> AuxStat:
    """:func:`losses.sequence_balance`: a mean over sequences = (sum of per-sequence losses) / S. Sequences
    must not straddle parts (true for micro-batches and ranks, which split by sequence)."""

    def stats() -> dict[str, Tensor]:
        S = int(torch.unique(seq_ids_T).numel()) if seq_ids_T.numel() else 0
        return {"seq_sum": losses.sequence_balance(scores_TE, ids_TK, seq_ids_T) * S, "S": _num(S, scores_TE)}

    return AuxStat(stats, lambda s: s["seq_sum"] / s["S"].clamp_min(1))


def cv2(v_E: Tensor, unbiased: bool = False, weight_E: Tensor | None = None) -> AuxStat:
    """:func:`losses.cv_squared` of a per-expert sum over tokens (importance = summed gates, load), times a
    constant per-expert weight (latency-aware)."""

    def fn(s: dict[str, Tensor]) -> Tensor:
        v = s["v_E"] if weight_E is None else s["v_E"] * weight_E.to(s["v_E"].dtype)
        return losses.cv_squared(v, unbiased)

    return AuxStat(lambda: {"v_E": v_E}, fn)


def hetero(probs_TE: Tensor, counts_E: Tensor, eta_E: Tensor) -> AuxStat:
    """MoE++ ``sum_i eta_i f_i P_i`` with ``f_i = counts_i / T`` (:func:`moesaic.moe.routing.moepp.hetero_balance`)."""

    def fn(s: dict[str, Tensor]) -> Tensor:
        T = s["T"].clamp_min(1)
        return (eta_E.to(T.dtype) * s["counts_E"] / T * s["psum_E"] / T).sum()

    return AuxStat(lambda: {"counts_E": _counts(counts_E, probs_TE), "psum_E": probs_TE.sum(0),
                            "T": _num(probs_TE.shape[0], probs_TE)}, fn)


def gate_usage(w_TE: Tensor, sel_TE: Tensor) -> AuxStat:
    """EvoMoE ``E^2 * mean_e(mean_t w * mean_t 1[selected])`` (:func:`moesaic.moe.routing.dts.dts_aux_loss`)."""
    E = w_TE.shape[1]

    def fn(s: dict[str, Tensor]) -> Tensor:
        T = s["T"].clamp_min(1)
        return (s["wsum_E"] / T * s["selsum_E"] / T).mean() * E * E

    return AuxStat(lambda: {"wsum_E": w_TE.sum(0), "selsum_E": sel_TE.detach().to(w_TE.dtype).sum(0),
                            "T": _num(w_TE.shape[0], w_TE)}, fn)


def combined(**parts: AuxStat) -> AuxStat:
    """The sum of several losses as one :class:`AuxStat` (statistics prefixed by the part's name)."""

    def stats() -> dict[str, Tensor]:
        return {f"{p}.{k}": v for p, st in parts.items() for k, v in st.stats().items()}

    def fn(s: dict[str, Tensor]) -> Tensor:
        return sum(st.fn({k.split(".", 1)[1]: v for k, v in s.items() if k.split(".", 1)[0] == p})
                   for p, st in parts.items())

    return AuxStat(stats, fn)


# ------------------------------------------------------------------------------------------ shares
def share(stat: AuxStat, local: dict[str, Tensor], total: dict[str, Tensor], w: float) -> Tensor:
    """This part's share of ``stat.fn(total)`` (module docstring): ``w L(S) + g . (S_m - w S)`` over the
    statistics of ``local`` that require grad. ``total`` is detached (float64 is best)."""
    leaves = {k: v.detach().to(torch.float64).requires_grad_(True) for k, v in total.items()}
    keys = [k for k, v in local.items() if v.requires_grad]
    with torch.enable_grad():
        L = stat.fn(leaves)
        grads = torch.autograd.grad(L, [leaves[k] for k in keys], allow_unused=True) if keys and L.requires_grad \
            else [None] * len(keys)
    ref = next(iter(local.values()))
    out = (w * L.detach()).to(ref.dtype)
    for k, g in zip(keys, grads):
        if g is not None:
            v = local[k]
            out = out + (g.to(v.dtype) * (v - w * total[k].to(v.device, v.dtype))).sum()
    return out
