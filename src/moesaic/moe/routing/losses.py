"""Balance and regularisation losses as pure functions (routing.md §1, §7; ST-MoE; Shazeer 2017).

Convention: every balance loss equals 1.0 under perfectly uniform routing (routing.md §0), so a
coefficient means the same thing across losses. ``f`` terms are counts (no gradient); gradients flow
through the probabilities only. All inputs cover valid tokens only: the router base class has already
removed padding.
"""

from __future__ import annotations

import torch
from torch import Tensor


def switch_balance(probs_TE: Tensor, counts_E: Tensor) -> Tensor:
    """Switch/GShard load balance ``E * sum_e f_e * P_e`` (Fedus et al. 2021, eq. 4).

    ``f_e = counts_E[e] / sum(counts_E)`` (fraction of assignments; pass top-1 counts for the GShard/Switch
    form, all k choices for the Mixtral/DeepSeek expert-level form) and ``P_e = mean_t probs_TE[t, e]``.
    Equals 1 at uniform routing and E when every token goes to one expert with probability 1. The
    DeepSeekMoE expert-level loss (``N'/(K'T) * count`` times ``P``) is the same quantity.
    """
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    f_E = counts_E.to(probs_TE.dtype) / counts_E.sum().clamp_min(1).to(probs_TE.dtype)
    P_E = probs_TE.mean(0)
    return E * (f_E.detach() * P_E).sum()


def device_balance(probs_TE: Tensor, counts_E: Tensor, num_groups: int) -> Tensor:
    """DeepSeekMoE device-level balance: ``sum_d mean_{i in d}(f_i) * sum_{i in d}(P_i)``, 1 at uniform.

    Experts are split into ``num_groups`` contiguous groups (devices); ``f_i = E * count_i / N``.
    """
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    f_E = E * counts_E.to(probs_TE.dtype) / counts_E.sum().clamp_min(1).to(probs_TE.dtype)
    P_E = probs_TE.mean(0)
    f_G = f_E.detach().view(num_groups, -1).mean(1)
    P_G = P_E.view(num_groups, -1).sum(1)
    return (f_G * P_G).sum()


def sequence_balance(scores_TE: Tensor, ids_TK: Tensor, seq_ids_T: Tensor) -> Tensor:
    """DeepSeek-V3 complementary sequence-wise balance (arXiv 2412.19437 eqs. 17-20), 1 at uniform.

    Per sequence: ``s' = s / sum_j s_j``, ``P_i = mean_t s'``, ``f_i = N/(K*T_seq) * #{t: i in topK(s_t)}``;
    the loss is ``sum_i f_i P_i`` averaged over the sequences. ``ids_TK`` must come from the unbiased
    scores (Appendix C.1).
    """
    T, E = scores_TE.shape
    if T == 0:
        return scores_TE.sum() * 0.0
    K = ids_TK.shape[1]
    norm_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(torch.finfo(scores_TE.dtype).tiny)
    _, seq_T = torch.unique(seq_ids_T, return_inverse=True)
    S = int(seq_T.max()) + 1
    tok_per_seq = torch.bincount(seq_T, minlength=S).to(scores_TE.dtype)
    P_SE = norm_TE.new_zeros(S, E).index_add(0, seq_T, norm_TE) / tok_per_seq[:, None]
    hits_SE = torch.zeros(S, E, dtype=scores_TE.dtype, device=scores_TE.device)
    hits_SE.index_put_((seq_T[:, None].expand(-1, K).reshape(-1), ids_TK.reshape(-1)),
                       torch.ones(T * K, dtype=scores_TE.dtype, device=scores_TE.device), accumulate=True)
    f_SE = E / (K * tok_per_seq[:, None]) * hits_SE
    return (f_SE.detach() * P_SE).sum(1).mean()


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(z_t)^2`` (Zoph et al. 2022, eq. 5), computed in fp32+."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    z = logits_TE.float() if logits_TE.dtype in (torch.float16, torch.bfloat16) else logits_TE
    return torch.logsumexp(z, dim=-1).square().mean()


def cv_squared(v: Tensor, unbiased: bool = False) -> Tensor:
    """Squared coefficient of variation ``Var(v) / (Mean(v)^2 + 1e-10)``; 0 for a single element.

    Population variance by default, like the TF original of Shazeer et al. (2017); ``unbiased=True``
    reproduces fastmoe/ShiftAddViT's ``x.var()``.
    """
    if v.numel() <= 1:
        return v.sum() * 0.0
    return v.var(unbiased=unbiased) / (v.mean().square() + 1e-10)


def router_entropy(probs_TE: Tensor) -> Tensor:
    """Mean entropy of the router distribution (the dynamic loss of top-p routing, routing.md §3)."""
    if probs_TE.shape[0] == 0:
        return probs_TE.sum() * 0.0
    p = probs_TE.clamp_min(torch.finfo(probs_TE.dtype).tiny)
    return -(probs_TE * p.log()).sum(-1).mean()


def expert_balance(probs_TE: Tensor, counts_E: Tensor) -> Tensor:
    """DeepSeekMoE expert-level balance ``sum_i f_i P_i`` with ``f_i = N'/(K'T) * count_i`` (arXiv 2401.06066
    §4.1). Identical to :func:`switch_balance` with the counts of all K' choices: 1 at uniform, E at collapse
    when K' = 1."""
    return switch_balance(probs_TE, counts_E)


def noisy_topk_load_prob(clean_TE: Tensor, noisy_TE: Tensor, sigma_TE: Tensor, k: int) -> Tensor:
    """Shazeer et al. (2017) smooth load ``P[t, e]`` (Appendix A, eq. 9): the probability that e stays in the
    top k of row t when only e's noise is re-drawn.

    ``thr_in`` is the (k+1)-th and ``thr_out`` the k-th largest noisy value of the row; for e in the
    top k, ``P = Phi((clean - thr_in) / sigma)``, otherwise ``Phi((clean - thr_out) / sigma)``. Needs
    ``E > k``.
    """
    T, E = noisy_TE.shape
    if E <= k:
        raise ValueError(f"smooth load needs num_experts > k (got E={E}, k={k})")
    top_TK1 = torch.sort(noisy_TE, dim=-1, descending=True, stable=True)
    vals_TK1, idx_TK1 = top_TK1.values[:, : k + 1], top_TK1.indices[:, :k]
    thr_in_T1, thr_out_T1 = vals_TK1[:, k:k + 1], vals_TK1[:, k - 1:k]
    in_top_TE = torch.zeros_like(noisy_TE, dtype=torch.bool).scatter_(1, idx_TK1, True)
    normal = torch.distributions.Normal(torch.zeros((), dtype=clean_TE.dtype, device=clean_TE.device),
                                        torch.ones((), dtype=clean_TE.dtype, device=clean_TE.device))
    p_in = normal.cdf((clean_TE - thr_in_T1) / sigma_TE)
    p_out = normal.cdf((clean_TE - thr_out_T1) / sigma_TE)
    return torch.where(in_top_TE, p_in, p_out)
