"""Expert-parallel dispatch: a local dispatcher, then an uneven all-to-all to the experts' ranks.

Experts are sharded contiguously: rank r of the expert-parallel group (size W) owns global experts
``[r*L, (r+1)*L)`` with ``L = E / W`` (DeepSpeed-MoE, GShard). ``dispatch``:

1. the local dispatcher (``sort`` by default, or ``capacity``) groups this rank's assignment rows by
   *global* expert, so the rows for rank r are one contiguous block;
2. the per-expert counts are exchanged with ``all_to_all_single`` on int64 (``recv_WL[s, l]`` = rows
   rank s sends to local expert l);
3. the rows are exchanged with ``all_to_all_single`` with uneven splits (differentiable both ways);
4. the received rows, ordered by (source rank, local expert), are regrouped by (local expert, source
   rank) so the experts see one contiguous block each: ``counts`` has L entries.

``combine`` reverses 4 and 3 and lets the local dispatcher scatter the rows back, weighted. Every rank
issues the same two collectives (plus one in combine) whatever its load; zero rows are fine. Capacity
dispatchers drop per rank, before the exchange (as Tutel and DeepSpeed do with local capacity).

Without a group (built from a config, or a group of size 1) this is exactly the local dispatcher.
:func:`moesaic.distributed.expert_parallel.apply_expert_parallel_` installs it with the group.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from moesaic.core.config import LayerShape, require
from moesaic.core.registry import DISPATCHERS
from moesaic.core.types import RoutingDecision
from moesaic.distributed.collectives import all_to_all, exchange_counts
from moesaic.distributed.groups import group_rank, group_size
from moesaic.moe.dispatch.base import Dispatcher, DispatcherConfig, DispatchState


class _Tie(torch.autograd.Function):
    """``y`` unchanged, with ``x`` as an extra input that gets a zero gradient. Ties the experts' output to
    their input so both exchanges are in every rank's backward graph even when an expert backend returns
    rows that do not depend on the input (e.g. no rows at all): otherwise one rank would skip a
    backward all-to-all that its peers issue (a collective mismatch)."""

    @staticmethod
    def forward(ctx, y: Tensor, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return g, g.new_zeros(ctx.x_shape, dtype=ctx.x_dtype)


def _default_local() -> DispatcherConfig:
    return DispatcherConfig.for_kind("sort")


@dataclasses.dataclass
class AllToAllDispatcherConfig(DispatcherConfig):
    local: DispatcherConfig = dataclasses.field(default_factory=_default_local)

    def validate(self, path: str) -> None:
        require(self.local.kind != "all_to_all", f"{path}.local.kind", self.local.kind,
                "the local dispatcher must group rows on one rank (e.g. sort or capacity)")

    def validate_moe(self, path: str, layer: LayerShape) -> None:
        self.local.validate_moe(f"{path}.local", layer)


@DISPATCHERS.register("all_to_all")
class AllToAllDispatcher(Dispatcher):
    """Expert parallel: local sort, then all-to-all of counts and tokens to the experts' ranks."""

    Config = AllToAllDispatcherConfig
    cfg: AllToAllDispatcherConfig
    index_dispatch = False  # rows must move between ranks: never the layer's fused local path

    def __init__(self, cfg: AllToAllDispatcherConfig, num_experts: int, top_k: int, *,
                 local: Dispatcher | None = None, group=None):
        super().__init__(cfg, num_experts, top_k)
        self.local = local if local is not None else cfg.local.build(num_experts, top_k)
        self.set_group(group)

    def set_group(self, group) -> None:
        """Use ``group`` (a torch.distributed process group, or None for one process)."""
        W = group_size(group)
        if self.num_experts % W:
            from moesaic.core.errors import ConfigError

            raise ConfigError("num_experts", self.num_experts, f"must be divisible by the expert-parallel size {W}")
        self.group, self.ep_size, self.ep_rank = group, W, group_rank(group)
        self.num_local = self.num_experts // W

    def dispatch(self, x_TD: Tensor, decision: RoutingDecision) -> tuple[Tensor, Tensor, DispatchState]:
        x_ND, counts_E, state = self.local.dispatch(x_TD, decision)
        if self.ep_size == 1:
            return x_ND, counts_E, state
        W, L = self.ep_size, self.num_local
        with torch.no_grad():
            send_WL = counts_E.view(W, L)
            recv_WL = exchange_counts(send_WL, self.group)
            send = send_WL.sum(1).tolist()
            recv = recv_WL.sum(1).tolist()
            # received rows are ordered (source, local expert); regroup by (local expert, source)
            local_id_M = torch.arange(L, device=x_ND.device).repeat(W).repeat_interleave(
                recv_WL.reshape(-1).to(x_ND.device))
            perm_M = torch.argsort(local_id_M, stable=True)
            unperm_M = torch.argsort(perm_M)
        x_MD = all_to_all(x_ND, recv, send, self.group).index_select(0, perm_M.to(x_ND.device))
        state.extra["ep"] = (unperm_M, send, recv, x_MD)
        return x_MD, recv_WL.sum(0).to(counts_E.device), state

    def combine(self, y_MD: Tensor, state: DispatchState) -> Tensor:
        if self.ep_size == 1:
            return self.local.combine(y_MD, state)
        unperm_M, send, recv, x_MD = state.extra["ep"]
        if torch.is_grad_enabled() and x_MD.requires_grad:
            y_MD = _Tie.apply(y_MD, x_MD)
        y_back = y_MD.index_select(0, unperm_M.to(y_MD.device))
        y_ND = all_to_all(y_back, send, recv, self.group)
        return self.local.combine(y_ND, state)

    def extra_repr(self) -> str:
        return f"ep_size={self.ep_size}, ep_rank={self.ep_rank}, local_experts={self.num_local}"
