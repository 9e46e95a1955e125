"""Expert parallelism applied from outside the model: shard and wrap the experts
(:class:`moesaic.distributed.ep_experts.ExpertParallelExperts`) and make the aux-loss-free bias global
(docs/parallel.md).

Usage (every rank, after ``torch.distributed`` is initialised and the model is built identically)::

    apply_expert_parallel_(model, groups.ep, batch_group=groups.dp)

Nothing here changes how a loss is computed or reduced: the training step does that explicitly. Each
rank's aux losses are its share of the global batch's (:func:`moesaic.train.exact_aux.global_aux`, or the
pre-pass totals of :func:`moesaic.train.exact_aux.aux_totals` all-reduced once), and gradients are summed
by the strategy (:class:`moesaic.distributed.strategy.ExpertDataParallel`: DDP for every non-expert
parameter, expert parameters over the expert-data-parallel group). The aux-loss-free bias's
``reduce_load`` sums the step's loads over ``batch_group`` before the sign update, so every rank moves its
bias identically, as one process would.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moesaic.core.errors import ConfigError
from moesaic.distributed.collectives import all_reduce_sum
from moesaic.distributed.ep_experts import ExpertParallelExperts, ExpertShard
from moesaic.distributed.groups import group_rank, group_size
from moesaic.moe.api import moe_layers
from moesaic.moe.layer import MoELayer


def apply_expert_parallel_(model: nn.Module, group: dist.ProcessGroup | None, *, batch_group: Any = "same"
                           ) -> nn.Module:
    """Shard every MoE layer's experts over ``group`` and wrap them in :class:`ExpertParallelExperts`,
    which exchanges rows with the other ranks (in place).

    ``group`` is the expert-parallel process group (``None`` or size 1: nothing is sharded, but the
    aux-loss-free bias still sums its loads over ``batch_group``). ``batch_group`` is the group the global
    batch is split over (default: ``group``). Raises :class:`ConfigError` naming the layer when a
    layer's expert count is not divisible by the group size. The layer code is untouched.
    """
    if batch_group == "same":
        batch_group = group
    W, r = group_size(group), group_rank(group)
    layers = moe_layers(model)
    for layer in layers:  # check everything before changing anything
        if layer.num_experts % W:
            raise ConfigError(f"{layer.layer_name}.num_experts", layer.num_experts,
                              f"must be divisible by the expert-parallel size ({W})")
        if getattr(layer.experts, "ep_shard", None) is not None:
            raise ConfigError(layer.layer_name, None, "expert parallelism is already applied", show_value=False)
    for layer in layers:
        shard = _shard_experts(layer, W, r)
        layer.experts = ExpertParallelExperts(layer.experts, layer.num_experts, group, shard)
        _make_router_global(layer, batch_group)
    return model


def _shard_experts(layer: MoELayer, W: int, r: int) -> ExpertShard:
    """Keep this rank's slice ``[r*L, (r+1)*L)`` of every stacked expert weight (in place)."""
    experts, E = layer.experts, layer.num_experts
    L = E // W
    names = experts.stacked_names()
    others = [n for n, _ in experts.named_parameters() if n not in names]
    if others:
        raise ConfigError(f"{layer.layer_name}.experts", experts.cfg.kind,
                          f"expert parallelism needs stacked per-expert weights; {others} are not stacked")
    for n in names:
        p = getattr(experts, n)
        setattr(experts, n, nn.Parameter(p.detach()[r * L:(r + 1) * L].clone(), requires_grad=p.requires_grad))
    experts.num_experts = L
    return ExpertShard(r * L, L, E)


# ------------------------------------------------------------------------------- aux-loss-free bias
def _make_router_global(layer: MoELayer, batch_group: dist.ProcessGroup | None) -> None:
    router = layer.router
    if hasattr(router, "reduce_load"):
        router.reduce_load = lambda t: all_reduce_sum(t, batch_group)


# ------------------------------------------------------------------------------------------- gradients
def is_expert_param(model: nn.Module) -> dict[str, bool]:
    """Parameter name -> whether it is an expert-parallel (sharded) expert weight."""
    expert_ids: set[int] = set()
    for layer in moe_layers(model):
        if getattr(layer.experts, "ep_shard", None) is not None:
            expert_ids.update(id(p) for p in layer.experts.parameters())
    return {n: id(p) in expert_ids for n, p in model.named_parameters()}


def global_count(n_local: int | float, group: dist.ProcessGroup | None) -> float:
    """Sum of a per-rank count over ``group`` (e.g. the tokens of the global batch)."""
    t = torch.tensor([float(n_local)], dtype=torch.float64)
    return float(all_reduce_sum(t, group)[0])
