"""The routing result every router returns, the dispatch plan every dispatcher makes, and the shape legend.

Shape suffixes used in the hot path: T tokens, D model width, F expert hidden width, H = F (plain MLP)
or 2F (gated), E experts, K top-k, N assignments (token, expert) pairs, C capacity, V vocabulary,
B sequences, M tokens per sequence (padded), S slots (Soft MoE).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


class AuxStatistic(Protocol):
    """An aux loss as a function of statistics that add over disjoint parts of a batch (micro-batches,
    ranks): ``value() == fn(stats())``. Implemented by :class:`moesaic.moe.routing.aux_stats.AuxStat`;
    docs/design.md, Balance statistics."""

    def stats(self) -> dict[str, Tensor]: ...

    def fn(self, s: Mapping[str, Tensor]) -> Tensor: ...

    def value(self) -> Tensor: ...


@dataclass(frozen=True)
class RoutingDecision:
    """Sparse assignments of tokens to experts in COO form (docs/design.md, RoutingDecision).

    COO rather than ``[T, K]`` lets token choice, expert choice, capacity drops, variable k (top-p,
    zero experts) and soft routing share one contract. Assignment n sends token ``token_idx_N[n]`` to
    expert ``expert_idx_N[n]`` with combine weight ``weight_N[n]`` (differentiable). ``choice_N[n]`` is
    the rank of that choice for its token (0 = best); capacity dispatchers fill first choices first.

    ``probs_TE``/``logits_TE`` hold the router's scores for all ``num_tokens`` rows (padding rows are 0)
    where the router has them. ``aux_stats`` are the router's named aux losses as statistics
    (:class:`AuxStatistic`), ``aux_losses`` their *unweighted* values over the valid tokens; the owning layer
    applies the coefficients. ``dropped`` counts assignments removed by a capacity limit.
    """

    token_idx_N: Tensor
    expert_idx_N: Tensor
    weight_N: Tensor
    num_tokens: int
    num_experts: int
    choice_N: Tensor | None = None
    probs_TE: Tensor | None = None
    logits_TE: Tensor | None = None
    dropped: int = 0
    num_valid_tokens: int | None = None  # tokens that were routed (padding excluded); None = all
    #: Payload for a paired dispatcher that is not plain COO (Soft MoE: slot logits, mask, sequence ids).
    extra: dict[str, Tensor] = field(default_factory=dict)
    #: The router's aux losses by name, each a statistic whose value is the loss, so a batch split over
    #: micro-batches or ranks gets exact shares (docs/design.md, Balance statistics).
    aux_stats: Mapping[str, AuxStatistic] = field(default_factory=dict)

    @functools.cached_property
    def aux_losses(self) -> dict[str, Tensor]:
        """The unweighted aux losses ``{name: aux_stats[name].value()}``, computed once per decision."""
        return {n: s.value() for n, s in self.aux_stats.items()}

    # ------------------------------------------------------------------------------------ building
    @staticmethod
    def from_topk(ids_TK: Tensor, w_TK: Tensor, num_experts: int, *, ids_nonnegative: bool = False,
                  **kwargs: Any) -> RoutingDecision:
        """From dense top-k ids and weights; ids < 0 mean "no expert" (variable k). A router whose ids are
        never negative says so with ``ids_nonnegative`` and skips the check (one device sync per call)."""
        T, K = ids_TK.shape
        if T == 1:  # one decode token: two ops instead of four
            token_idx_N = torch.zeros(K, dtype=torch.long, device=ids_TK.device)
            choice_N = torch.arange(K, device=ids_TK.device)
        else:
            token_idx_N = torch.arange(T, device=ids_TK.device).repeat_interleave(K)
            choice_N = torch.arange(K, device=ids_TK.device).repeat(T)
        expert_idx_N = ids_TK.reshape(-1)
        weight_N = w_TK.reshape(-1)
        with torch.no_grad():
            has_neg = (bool((expert_idx_N < 0).any()) if expert_idx_N.numel() and not ids_nonnegative
                       else False)
        if has_neg:
            keep = (expert_idx_N >= 0).nonzero().squeeze(1)
            token_idx_N, choice_N = token_idx_N[keep], choice_N[keep]
            expert_idx_N, weight_N = expert_idx_N[keep], weight_N[keep]
        return RoutingDecision(token_idx_N, expert_idx_N, weight_N, T, num_experts, choice_N=choice_N, **kwargs)

    def replace(self, **changes: Any) -> RoutingDecision:
        return dataclasses.replace(self, **changes)

    def select(self, keep_N: Tensor) -> RoutingDecision:
        """Keep the assignments at the given indices (or bool mask); the rest count as dropped."""
        if keep_N.dtype == torch.bool:
            keep_N = keep_N.nonzero().squeeze(1)
        n_drop = self.num_assignments - keep_N.numel()
        return self.replace(
            token_idx_N=self.token_idx_N[keep_N], expert_idx_N=self.expert_idx_N[keep_N],
            weight_N=self.weight_N[keep_N],
            choice_N=None if self.choice_N is None else self.choice_N[keep_N],
            dropped=self.dropped + n_drop,
        )

    def expand_tokens(self, rows_V: Tensor, num_tokens: int) -> RoutingDecision:
        """Map a decision made on a subset of rows (the valid tokens) back to all ``num_tokens`` rows."""

        def scatter(s_VE: Tensor | None) -> Tensor | None:
            if s_VE is None:
                return None
            out = s_VE.new_zeros(num_tokens, s_VE.shape[1])
            return out.index_copy(0, rows_V, s_VE)

        return self.replace(
            token_idx_N=rows_V[self.token_idx_N], num_tokens=num_tokens, num_valid_tokens=rows_V.numel(),
            probs_TE=scatter(self.probs_TE), logits_TE=scatter(self.logits_TE),
        )

    # ---------------------------------------------------------------------------------- reading
    @property
    def valid_tokens(self) -> int:
        return self.num_tokens if self.num_valid_tokens is None else self.num_valid_tokens

    @property
    def num_assignments(self) -> int:
        return self.token_idx_N.numel()

    def tokens_per_expert(self) -> Tensor:
        """Assignments per expert, ``[E]`` int64; sums to N."""
        return torch.bincount(self.expert_idx_N, minlength=self.num_experts)

    def experts_per_token(self) -> Tensor:
        """Assignments per token, ``[T]`` int64."""
        return torch.bincount(self.token_idx_N, minlength=self.num_tokens)

    def dense(self) -> Tensor:
        """Combine weights as a dense ``[T, E]`` matrix (0 where not routed). For tests and analysis."""
        w_TE = self.weight_N.new_zeros(self.num_tokens, self.num_experts)
        return w_TE.index_put((self.token_idx_N, self.expert_idx_N), self.weight_N, accumulate=True)

    def to_topk(self, k: int | None = None) -> tuple[Tensor, Tensor]:
        """Dense ``[T, K]`` ids (-1 padded) and weights, ordered by ``choice_N`` where known."""
        per_tok = self.experts_per_token()
        K = int(per_tok.max()) if k is None and per_tok.numel() else (k or 0)
        ids_TK = torch.full((self.num_tokens, K), -1, dtype=torch.long, device=self.expert_idx_N.device)
        w_TK = self.weight_N.new_zeros(self.num_tokens, K)
        if self.num_assignments == 0:
            return ids_TK, w_TK
        order = torch.argsort(self.token_idx_N * (K + 1) + (self.choice_N if self.choice_N is not None else 0),
                              stable=True)
        tok = self.token_idx_N[order]
        start = torch.cumsum(per_tok, 0) - per_tok
        slot = torch.arange(tok.numel(), device=tok.device) - start[tok]
        ids_TK[tok, slot] = self.expert_idx_N[order]
        w_TK = w_TK.index_put((tok, slot), self.weight_N[order])
        return ids_TK, w_TK


def scatter_combine(y_ND: Tensor, token_idx_N: Tensor, weight_N: Tensor, num_tokens: int) -> Tensor:
    """``y_TD[t] = sum_{n: token_idx_N[n] = t} weight_N[n] * y_ND[n]``; tokens without a row get 0."""
    y_TD = y_ND.new_zeros(num_tokens, y_ND.shape[1])
    return y_TD.index_add_(0, token_idx_N, y_ND * weight_N.to(y_ND.dtype).unsqueeze(1))


@dataclass(frozen=True)
class SlotMixing:
    """The slots of Soft MoE (Puigcerver et al. 2024, "From Sparse to Soft Mixtures of Experts").

    Per live sequence b (one with at least one real token; ``num_seqs`` of them) with tokens ``X_b``
    ``[M, D]`` (padded to the longest): slots ``X_slots = dispatch_BMS[b]^T X_b`` ``[S, D]`` with
    ``S = E * slots_per_expert`` (expert e gets slots ``[e*p, (e+1)*p)`` of every sequence), and outputs
    ``Y_b = combine_BMS[b] @ Y_slots``. Token ``rows_R[r]`` sits at ``(seq_R[r], pos_R[r])``; tokens of
    sequences without a real token are not rows and get output 0.
    """

    dispatch_BMS: Tensor  # softmax over tokens m (padding 0)
    combine_BMS: Tensor  # softmax over slots s (padding rows 0)
    rows_R: Tensor  # [R] token index of each row of a live sequence
    seq_R: Tensor  # [R] its live sequence 0..B-1
    pos_R: Tensor  # [R] its position in that sequence
    valid_R: Tensor  # [R] bool: a real token (padding rows get dispatch weight 0 and are zeroed)
    slots_per_expert: int

    @property
    def num_seqs(self) -> int:
        return self.dispatch_BMS.shape[0]

    def gather(self, x_TD: Tensor, num_experts: int) -> Tensor:
        """Slot inputs grouped by expert: ``[E * B * p, D]``, expert e's ``B * p`` rows in a block."""
        (B, M, _), p, D = self.dispatch_BMS.shape, self.slots_per_expert, x_TD.shape[1]
        # padding has dispatch weight 0, but 0 * NaN is NaN: padding may hold anything, so zero it first
        x_R = x_TD[self.rows_R].masked_fill(~self.valid_R[:, None], 0.0)
        x_BMD = x_TD.new_zeros(B, M, D).index_put((self.seq_R, self.pos_R), x_R)
        xs_BSD = torch.einsum("bms,bmd->bsd", self.dispatch_BMS.to(x_TD.dtype), x_BMD)
        return xs_BSD.view(B, num_experts, p, D).transpose(0, 1).reshape(num_experts * B * p, D)

    def combine(self, y_ND: Tensor, num_experts: int, num_tokens: int) -> Tensor:
        """Token outputs ``[T, D]``: each token's combine-weighted mix of its sequence's slot outputs."""
        B, p, D = self.num_seqs, self.slots_per_expert, y_ND.shape[1]
        ys_BSD = y_ND.view(num_experts, B, p, D).transpose(0, 1).reshape(B, num_experts * p, D)
        y_BMD = torch.einsum("bms,bsd->bmd", self.combine_BMS.to(y_ND.dtype), ys_BSD)
        return y_ND.new_zeros(num_tokens, D).index_copy(0, self.rows_R, y_BMD[self.seq_R, self.pos_R])


@dataclass(frozen=True)
class DispatchPlan:
    """What the experts need from a routing decision, grouped by expert (docs/design.md, "The data path").

    Sparse dispatch (every dispatcher but Soft MoE): row n of the grouped input is token
    ``token_idx_N[n]``; rows are ordered by expert, ``counts_E[e]`` rows for expert e; the expert output of
    row n enters token ``token_idx_N[n]``'s output with weight ``weight_N[n]`` (differentiable).
    ``dropped`` counts assignments a capacity limit removed. Soft MoE: ``slots`` holds the slot mixing
    weights, the rows are slot mixes (``counts_E[e] = B * p``) and ``token_idx_N``/``weight_N`` are empty.

    :meth:`gather` and :meth:`combine` are the readable reference of what a plan means
    (``y_TD = combine(expert_e(gather(x_TD)))``); fast backends may fold them into their kernels
    (ScatterMoE: Tan et al. 2024) but must compute the same function.
    """

    token_idx_N: Tensor
    weight_N: Tensor
    counts_E: Tensor
    num_tokens: int
    dropped: int = 0
    slots: SlotMixing | None = None

    @staticmethod
    def grouped(counts_E: Tensor, weight_N: Tensor | None = None) -> DispatchPlan:
        """Rows already grouped by expert (row n is "token" n), weight 1 unless given: runs experts on rows."""
        N = int(counts_E.sum())
        w_N = weight_N if weight_N is not None else torch.ones(N, device=counts_E.device)
        return DispatchPlan(torch.arange(N, device=counts_E.device), w_N, counts_E, N)

    @property
    def num_experts(self) -> int:
        return self.counts_E.shape[0]

    @property
    def num_rows(self) -> int:
        """Rows the experts compute: N assignments, or ``E * B * p`` slots."""
        if self.slots is not None:
            return self.num_experts * self.slots.num_seqs * self.slots.slots_per_expert
        return self.token_idx_N.shape[0]

    def gather(self, x_TD: Tensor) -> Tensor:
        """``x_ND``: the expert input rows, grouped by expert."""
        if self.slots is not None:
            return self.slots.gather(x_TD, self.num_experts)
        return x_TD.index_select(0, self.token_idx_N)

    def combine(self, y_ND: Tensor) -> Tensor:
        """``y_TD``: the expert output rows scattered back to their tokens, weighted."""
        if self.slots is not None:
            return self.slots.combine(y_ND, self.num_experts, self.num_tokens)
        return scatter_combine(y_ND, self.token_idx_N, self.weight_N, self.num_tokens)
