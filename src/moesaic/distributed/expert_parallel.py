"""Expert parallelism applied from outside the model: shard experts, swap the dispatcher, make aux
losses and balancing global, and reduce gradients over the right groups.

Usage (every rank, after ``torch.distributed`` is initialised and the model is built identically)::

    groups = build_groups(ep_size)
    apply_expert_parallel_(model, groups.ep, batch_group=groups.dp)
    ...
    loss = task_loss_sum / global_count(n_local, groups.dp) + collect_aux_losses(model)
    loss.backward(); sync_gradients(model, groups); opt.step(); on_optimizer_step(model, step)

**Loss definition (global batch, equal to one process).** The global batch is split over every rank of
``batch_group``. Each rank's objective is its *share* of the one-process objective, so the shares sum
to it and gradients are SUM-reduced (never averaged):

* task loss: ``sum over local tokens / number of tokens in the global batch`` (:func:`global_count`);
* aux losses: one router hook shared with exact gradient accumulation
  (:mod:`moesaic.train.global_aux`) all-reduces each router's additive statistics
  (:mod:`moesaic.moe.routing.aux_stats`) and rewrites its losses to this rank's share. Switch/GShard
  ``E * sum_e f_e P_e`` and ``device_balance``: ``f_e`` from the global counts, ``P_e`` = this rank's
  probability sum over the global token count; the sequence-wise loss: the sum of this rank's
  per-sequence losses over the global sequence count; CV^2 losses: the linearised share; token means
  (z-loss, entropy; also any undeclared loss, as before): local value times ``T_local / T_global``.
  Under gradient accumulation with ``train.aux_accumulation: exact`` the totals are those of the whole
  step (pre-pass, then one all-reduce).
* aux-loss-free bias: the router's ``reduce_load`` sums the step's loads over ``batch_group`` before
  the sign update, so every rank moves its bias identically, as one process would.

**Gradients.** Expert parameters are summed over the expert-data-parallel group only (their gradient
already holds the contributions of the whole EP group through the all-to-all backward); every other
parameter is summed over the data-parallel group. We use one explicit flat all-reduce per group after
``backward`` instead of DDP: it is deterministic (bitwise reruns), it never interleaves with the
all-to-alls of the backward pass on the same gloo group, experts with zero tokens need no
``find_unused_parameters``, and the group of every parameter is explicit (and tested). At the tiny
scale this toolkit tests, overlapping the reduction with backward would buy nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from moesaic.core.errors import ConfigError
from moesaic.distributed.collectives import all_reduce_sum
from moesaic.distributed.groups import ParallelGroups, group_rank, group_size
from moesaic.moe.api import moe_layers
from moesaic.moe.dispatch.all_to_all import AllToAllDispatcher
from moesaic.moe.layer import MoELayer
from moesaic.train.global_aux import GlobalAux


@dataclasses.dataclass
class ExpertShard:
    """Which global experts this rank holds for one layer: ``[offset, offset + num_local)`` of ``num_global``."""

    offset: int
    num_local: int
    num_global: int


def apply_expert_parallel_(model: nn.Module, group, *, batch_group: Any = "same") -> nn.Module:
    """Shard every MoE layer's experts over ``group`` and install the all-to-all dispatcher (in place).

    ``group`` is the expert-parallel process group (``None`` or size 1: nothing is sharded, but the
    global-batch aux losses still apply over ``batch_group``). ``batch_group`` is the group the global
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
        _shard_experts(layer, W, r)
        local = layer.dispatcher.local if isinstance(layer.dispatcher, AllToAllDispatcher) else layer.dispatcher
        cfg = AllToAllDispatcher.Config(local=local.cfg)
        layer.dispatcher = AllToAllDispatcher(cfg, layer.num_experts, layer.top_k, local=local, group=group)
        _make_router_global(layer, batch_group)
    GlobalAux.install(model, batch_group)  # aux losses: this rank's share of the global batch's
    model._moesaic_ep = (group, batch_group)  # type: ignore[attr-defined]
    return model


def _shard_experts(layer: MoELayer, W: int, r: int) -> None:
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
    experts.ep_shard = ExpertShard(r * L, L, E)


# ------------------------------------------------------------------------------------ global aux losses
def _make_router_global(layer: MoELayer, batch_group) -> None:
    router = layer.router
    if hasattr(router, "reduce_load"):
        router.reduce_load = lambda t: all_reduce_sum(t, batch_group)


# ------------------------------------------------------------------------------------------- gradients
def is_expert_param(model: nn.Module) -> dict[str, bool]:
    """Parameter name -> whether it is an expert-parallel (sharded) expert weight."""
    expert_ids = set()
    for layer in moe_layers(model):
        if getattr(layer.experts, "ep_shard", None) is not None:
            expert_ids.update(id(p) for p in layer.experts.parameters())
    return {n: id(p) in expert_ids for n, p in model.named_parameters()}


def _reduce_flat(params: list[nn.Parameter], group) -> None:
    if not params or group_size(group) == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        all_reduce_sum(flat, group)
        start = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(flat[start:start + n].view_as(p.grad))
            start += n


def sync_gradients(model: nn.Module, groups: ParallelGroups) -> dict[str, list[str]]:
    """SUM-reduce gradients: expert parameters over ``groups.edp``, the rest over ``groups.dp``.

    Returns the parameter names reduced per group (``{"edp": [...], "dp": [...]}``) for inspection.
    """
    kinds = is_expert_param(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    expert = [(n, p) for n, p in named if kinds[n]]
    dense = [(n, p) for n, p in named if not kinds[n]]
    _reduce_flat([p for _, p in expert], groups.edp)
    _reduce_flat([p for _, p in dense], groups.dp)
    return {"edp": [n for n, _ in expert], "dp": [n for n, _ in dense]}


def global_count(n_local: int | float, group) -> float:
    """Sum of a per-rank count over ``group`` (e.g. the tokens of the global batch)."""
    t = torch.tensor([float(n_local)], dtype=torch.float64)
    return float(all_reduce_sum(t, group)[0])
