"""Expert parallelism as a wrapper around one layer's experts (GShard: Lepikhin et al. 2020; DeepSpeed-MoE:
Rajbhandari et al. 2022; docs/design.md, "Expert parallelism").

Experts are sharded contiguously: rank r of the expert-parallel group (size W) holds global experts
``[r*L, (r+1)*L)`` with ``L = E / W``. The layer, its router and its dispatcher are unchanged and make
the same plan over all E experts as in one process; :meth:`ExpertParallelExperts.forward` then

1. gathers this rank's rows (``plan.gather``: grouped by global expert, so the rows for rank r are one
   contiguous block);
2. exchanges the per-expert counts (``all_to_all_single`` on int64: ``recv_WL[s, l]`` = rows rank s sends
   to local expert l) and the rows (uneven ``all_to_all_single``, differentiable both ways);
3. runs the local experts on the received rows with a local plan: the received rows are ordered by
   (source rank, local expert); the local plan groups them by (local expert, source rank) and, with
   weight 1, scatters the outputs back into the received order;
4. exchanges the outputs back and lets the original plan combine them into tokens, weighted.

Every rank issues the same collectives (two exchanges and the counts forward, two exchanges backward)
whatever its load; zero rows are fine. Capacity dispatchers drop per rank, before the exchange (as Tutel
and DeepSpeed do with a local capacity). Soft MoE slots travel like token rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.types import DispatchPlan
from moesaic.distributed.collectives import all_to_all, exchange_counts
from moesaic.distributed.groups import group_rank, group_size
from moesaic.moe.experts.base import Experts


@dataclasses.dataclass
class ExpertShard:
    """Which global experts this rank holds for one layer: ``[offset, offset + num_local)`` of ``num_global``."""

    offset: int
    num_local: int
    num_global: int


class _Tie(torch.autograd.Function):
    """``y`` unchanged, with ``x`` as an extra input that gets a zero gradient. Ties the local experts' output
    to their received input so both exchanges are in every rank's backward graph even when the output
    does not depend on the input (no rows at all): otherwise one rank would skip a backward all-to-all
    that its peers issue (a collective mismatch, a hang)."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, x: Tensor) -> Tensor:
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:
        return g, g.new_zeros(ctx.x_shape, dtype=ctx.x_dtype)


def _tie(y: Tensor, x: Tensor) -> Tensor:
    out: Tensor = _Tie.apply(y, x)
    return out


class ExpertParallelExperts(nn.Module):
    """One layer's experts sharded over an expert-parallel group; the experts interface over all E experts.

    ``local`` holds this rank's ``L`` experts (already sliced). The wrapper shares ``local``'s parameter,
    buffer and child-module tables, so parameter and checkpoint names are the same with and without
    expert parallelism (``moe.experts.w_up_EHD``); other attributes (``cfg``, ``gated``,
    ``on_optimizer_step``, ...) are read from ``local``.
    """

    local: Experts

    def __init__(self, local: Experts, num_experts: int, group: Any, shard: ExpertShard):
        super().__init__()
        self._parameters = local._parameters
        self._buffers = local._buffers
        self._modules = local._modules
        object.__setattr__(self, "local", local)  # not a child: its tensors are already ours, same names
        self.num_experts, self.group, self.shard = num_experts, group, shard
        self.ep_size, self.ep_rank = group_size(group), group_rank(group)
        self.received_counts: Tensor | None = None  # rows each local expert got in the last forward

    @property
    def ep_shard(self) -> ExpertShard:
        return self.shard

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "local" not in self.__dict__:
                raise
            return getattr(self.local, name)

    def train(self, mode: bool = True) -> ExpertParallelExperts:
        super().train(mode)
        self.local.train(mode)
        return self

    def forward(self, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        local = self.local
        if self.ep_size == 1:
            self.received_counts = plan.counts_E.detach()
            y_TD: Tensor = local(x_TD, plan)
            return y_TD
        W, L = self.ep_size, self.shard.num_local
        x_ND = plan.gather(x_TD)
        with torch.no_grad():
            send_WL = plan.counts_E.view(W, L)
            recv_WL = exchange_counts(send_WL, self.group).to(plan.counts_E.device)
            send, recv = send_WL.sum(1).tolist(), recv_WL.sum(1).tolist()
            # received rows are ordered (source, local expert); the local plan groups them by (local expert, source)
            local_id_M = torch.arange(L, device=x_ND.device).repeat(W).repeat_interleave(recv_WL.reshape(-1))
            order_M = torch.argsort(local_id_M, stable=True)
        x_MD = all_to_all(x_ND, recv, send, self.group)
        ones_M = torch.ones(x_MD.shape[0], dtype=x_MD.dtype, device=x_MD.device)
        local_plan = DispatchPlan(order_M, ones_M, recv_WL.sum(0), x_MD.shape[0])
        y_MD = local(x_MD, local_plan)
        if torch.is_grad_enabled() and x_MD.requires_grad:
            y_MD = _tie(y_MD, x_MD)
        self.received_counts = local_plan.counts_E
        y_ND = all_to_all(y_MD, send, recv, self.group)
        return plan.combine(y_ND)

    def stacked_names(self) -> list[str]:
        names: list[str] = self.local.stacked_names()
        return names

    def expert_state(self, e: int) -> dict[str, Tensor]:
        """Global expert ``e``'s tensors; only this rank's experts are held here."""
        state: dict[str, Tensor] = self.local.expert_state(self._local_index(e))
        return state

    def load_expert_state(self, e: int, state: dict[str, Tensor]) -> None:
        self.local.load_expert_state(self._local_index(e), state)

    def _local_index(self, e: int) -> int:
        s = self.shard
        if not s.offset <= e < s.offset + s.num_local:
            raise IndexError(f"expert {e} is held by another rank (this rank holds "
                             f"[{s.offset}, {s.offset + s.num_local}) of {s.num_global})")
        return e - s.offset

    def extra_repr(self) -> str:
        return (f"ep_size={self.ep_size}, ep_rank={self.ep_rank}, local_experts={self.shard.num_local}, "
                f"local={self.local!r}")
