"""The shared router losses, each defined once as an :class:`~moesaic.moe.routing.aux_stats.AuxStat`.

Convention: every balance loss equals 1.0 under perfectly uniform routing, so a coefficient means the same
thing across losses (the normalisation of Fedus et al. 2021, eq. 4; DeepSeekMoE and DeepSeek-V3 scale
``f`` the same way). ``f`` terms are counts (no gradient); gradients flow through the probabilities only.
Inputs cover valid tokens only: the router base class has removed padding. A batch without tokens gives
exactly 0, with a graph. Losses that belong to one paper live next to its router (MoE++ in ``moepp.py``,
EvoMoE in ``dts.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from moesaic.moe.routing.aux_stats import AuxStat, TokenMean, count


class AssignmentBalance(AuxStat):
    """Base of the losses built from the assignment counts ``f`` and the mean probabilities ``P`` of each
    expert. Statistics: ``counts_E`` (no gradient), ``psum_E`` (summed probabilities) and ``T`` (tokens)."""

    def __init__(self, probs_TE: Tensor, counts_E: Tensor | Callable[[], Tensor]):
        self.probs_TE = probs_TE
        self._counts_E = counts_E  # or a function computing them when first needed (decoding never does)

    @property
    def counts_E(self) -> Tensor:
        if callable(self._counts_E):
            self._counts_E = self._counts_E()
        return self._counts_E

    def stats(self) -> dict[str, Tensor]:
        p = self.probs_TE
        return {"counts_E": self.counts_E.detach().to(p.dtype), "psum_E": p.sum(0), "T": count(p.shape[0], p)}


class SwitchBalance(AssignmentBalance):
    """Switch/GShard load balance ``E * sum_e f_e P_e`` (Fedus et al. 2021, "Switch Transformers", eq. 4).

    ``f_e = counts_E[e] / sum(counts_E)``, the fraction of assignments: pass the top-1 counts for the
    GShard/Switch form, the counts of all k choices for the Mixtral form. With all K' choices it is also the
    expert-level loss of DeepSeekMoE (Dai et al. 2024: ``f_i = N'/(K'T) count_i``, ``P_i`` the mean
    score). ``P_e = mean_t probs_TE[t, e]``. 1 at uniform routing, E when every token goes to one expert
    with probability 1. ``scale_by_assignments`` multiplies by the assignments per token (top-p's
    ``balance_normalization: tokens``). Statistics: counts, summed probabilities, tokens.
    """

    def __init__(self, probs_TE: Tensor, counts_E: Tensor | Callable[[], Tensor], scale_by_assignments: bool = False):
        super().__init__(probs_TE, counts_E)
        self.scale_by_assignments = scale_by_assignments

    def fn(self, s: Mapping[str, Tensor]) -> Tensor:
        c_E, T = s["counts_E"], s["T"].clamp_min(1)
        f_E = c_E / c_E.sum().clamp_min(1)
        out = s["psum_E"].shape[-1] * (f_E * (s["psum_E"] / T)).sum()
        return out * (c_E.sum() / T) if self.scale_by_assignments else out


class DeviceBalance(AssignmentBalance):
    """DeepSeekMoE device-level balance ``sum_d mean_{i in d}(f_i) * sum_{i in d}(P_i)`` (Dai et al. 2024,
    "DeepSeekMoE"), 1 at uniform routing. Experts form ``num_groups`` contiguous groups (devices);
    ``f_i = E * count_i / N``."""

    def __init__(self, probs_TE: Tensor, counts_E: Tensor | Callable[[], Tensor], num_groups: int):
        super().__init__(probs_TE, counts_E)
        self.num_groups = num_groups

    def fn(self, s: Mapping[str, Tensor]) -> Tensor:
        c_E, T, G = s["counts_E"], s["T"].clamp_min(1), self.num_groups
        f_E = c_E.shape[-1] * c_E / c_E.sum().clamp_min(1)
        f_G = f_E.view(G, -1).mean(1)
        P_G = (s["psum_E"] / T).view(G, -1).sum(1)
        return (f_G * P_G).sum()


class SequenceBalance(AuxStat):
    """DeepSeek-V3 complementary sequence-wise balance (DeepSeek-AI 2024, arXiv 2412.19437, eqs. 17-20), 1 at
    uniform routing, averaged over the sequences of the batch.

    Per sequence: ``s' = s / sum_j s_j``, ``P_i = mean_t s'_i``, ``f_i = N/(K T_seq) * #{t: i in TopK(s_t)}``,
    loss ``sum_i f_i P_i``. ``ids_TK`` must be the top-K of the *unbiased* scores over all routed experts
    (Eq. 18), whatever selected the experts (bias, group limit). The statistics are the sum of the
    per-sequence losses and the number of sequences: exact as long as no sequence straddles two parts of a
    batch (micro-batches and ranks split by sequence).
    """

    def __init__(self, scores_TE: Tensor, ids_TK: Tensor, seq_ids_T: Tensor):
        self.scores_TE, self.ids_TK, self.seq_ids_T = scores_TE, ids_TK, seq_ids_T

    def stats(self) -> dict[str, Tensor]:
        s_TE, ids_TK = self.scores_TE, self.ids_TK
        T, E = s_TE.shape
        if T == 0:
            return {"seq_sum": s_TE.sum() * 0.0, "S": count(0, s_TE)}
        K = ids_TK.shape[1]
        norm_TE = s_TE / s_TE.sum(-1, keepdim=True).clamp_min(torch.finfo(s_TE.dtype).tiny)
        _, seq_T = torch.unique(self.seq_ids_T, return_inverse=True)
        S = int(seq_T.max()) + 1
        tok_S = torch.bincount(seq_T, minlength=S).to(s_TE.dtype)
        P_SE = norm_TE.new_zeros(S, E).index_add(0, seq_T, norm_TE) / tok_S[:, None]
        hits_SE = torch.zeros(S, E, dtype=s_TE.dtype, device=s_TE.device)
        hits_SE.index_put_((seq_T[:, None].expand(-1, K).reshape(-1), ids_TK.reshape(-1)),
                           torch.ones(T * K, dtype=s_TE.dtype, device=s_TE.device), accumulate=True)
        f_SE = E / (K * tok_S[:, None]) * hits_SE
        return {"seq_sum": (f_SE * P_SE).sum(1).sum(), "S": count(S, s_TE)}

    def fn(self, s: Mapping[str, Tensor]) -> Tensor:
        return s["seq_sum"] / s["S"].clamp_min(1)


def cv_squared(v: Tensor, unbiased: bool = False) -> Tensor:
    """Squared coefficient of variation ``Var(v) / (Mean(v)^2 + 1e-10)``; 0 for a single element.

    Population variance by default, like the TensorFlow original of Shazeer et al. (2017); ``unbiased=True``
    reproduces fastmoe's and ShiftAddViT's ``x.var()``.
    """
    if v.numel() <= 1:
        return v.sum() * 0.0
    return v.var(unbiased=unbiased) / (v.mean().square() + 1e-10)


class CV2(AuxStat):
    """:func:`cv_squared` of a per-expert sum over tokens (importance = summed gates, load = counts or smooth
    load; Shazeer et al. 2017, "Outrageously Large Neural Networks", Appendix A), optionally times a
    constant per-expert weight (ShiftAddViT's latencies). Statistic: the per-expert sum itself."""

    def __init__(self, v_E: Tensor, unbiased: bool = False, weight_E: Tensor | None = None):
        self.v_E, self.unbiased, self.weight_E = v_E, unbiased, weight_E

    def stats(self) -> dict[str, Tensor]:
        return {"v_E": self.v_E}

    def fn(self, s: Mapping[str, Tensor]) -> Tensor:
        v_E = s["v_E"] if self.weight_E is None else s["v_E"] * self.weight_E.to(s["v_E"].dtype)
        return cv_squared(v_E, self.unbiased)


def z_loss(logits_TE: Tensor) -> TokenMean:
    """ST-MoE router z-loss ``mean_t logsumexp(z_t)^2`` (Zoph et al. 2022, eq. 5), computed in fp32 or better."""
    z_TE = logits_TE.float() if logits_TE.dtype in (torch.float16, torch.bfloat16) else logits_TE
    return TokenMean(torch.logsumexp(z_TE, dim=-1).square())


def router_entropy(probs_TE: Tensor) -> TokenMean:
    """Mean entropy of the router distribution: the dynamic loss of top-p routing (Huang et al. 2024,
    "Harder Tasks Need More Experts")."""
    p_TE = probs_TE.clamp_min(torch.finfo(probs_TE.dtype).tiny)
    return TokenMean(-(probs_TE * p_TE.log()).sum(-1))
