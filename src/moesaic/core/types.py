"""The routing result shared by every router and dispatcher, and the shape legend.

Shape suffixes used in the hot path: T tokens, D model width, F expert hidden width, H = F (plain MLP)
or 2F (gated), E experts, K top-k, N assignments (token, expert) pairs, C capacity, V vocabulary.
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
    def from_topk(ids_TK: Tensor, w_TK: Tensor, num_experts: int, **kwargs: Any) -> RoutingDecision:
        """From dense top-k ids and weights; ids < 0 mean "no expert" (variable k)."""
        T, K = ids_TK.shape
        token_idx_N = torch.arange(T, device=ids_TK.device).repeat_interleave(K)
        choice_N = torch.arange(K, device=ids_TK.device).repeat(T)
        expert_idx_N = ids_TK.reshape(-1)
        weight_N = w_TK.reshape(-1)
        with torch.no_grad():
            has_neg = bool((expert_idx_N < 0).any()) if expert_idx_N.numel() else False
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
