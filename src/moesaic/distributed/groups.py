"""Process groups for expert parallelism (the DeepSpeed-MoE layout: Rajbhandari et al. 2022,
"DeepSpeed-MoE"; docs/parallel.md, "Layout").

For world size ``W`` and ``ep_size = P`` (``W % P == 0``):

* expert-parallel (EP) groups are contiguous blocks ``{iP, ..., iP+P-1}``: the all-to-all runs here;
* expert-data-parallel (EDP) groups are strided ``{j, j+P, j+2P, ...}``: expert gradients are summed here;
* the data-parallel (DP) group is the whole world: dense gradients, aux-loss statistics and the
  aux-loss-free bias loads are summed here (the global batch is split over every rank).

Every group is created with a timeout, so a rank that dies or hangs turns into an error on the others
instead of a hang. Runtime handles never go into configs (``parallel.ep_size`` is the config).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import torch.distributed as dist

from moesaic.core.errors import ConfigError

DEFAULT_TIMEOUT_S = 60.0


@dataclasses.dataclass
class ParallelGroups:
    """The groups a rank belongs to; ``None`` groups mean "just this process" (no communication)."""

    world_size: int = 1
    rank: int = 0
    ep_size: int = 1
    ep: dist.ProcessGroup | None = None  # expert-parallel group of this rank
    edp: dist.ProcessGroup | None = None  # expert-data-parallel group of this rank
    dp: dist.ProcessGroup | None = None  # every rank (the global batch)

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep_size


def timeout_s() -> float:
    """The process-group timeout: ``MOESAIC_PG_TIMEOUT`` seconds, 60 by default."""
    return float(os.environ.get("MOESAIC_PG_TIMEOUT", DEFAULT_TIMEOUT_S))


def init_process_group(backend: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> None:
    """``torch.distributed.init_process_group`` with our timeout (env:// by default, as torchrun sets)."""
    if dist.is_initialized():
        return
    if backend is None:
        import torch

        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout or timeout_s()), **kwargs)


def build_groups(ep_size: int, *, timeout: float | None = None) -> ParallelGroups:
    """Create the EP, EDP and DP groups (collective: every rank must call it with the same ``ep_size``)."""
    if not dist.is_available() or not dist.is_initialized():
        if ep_size != 1:
            raise ConfigError("parallel.ep_size", ep_size, "needs torch.distributed (launch with torchrun or --nproc)")
        return ParallelGroups()
    W, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or W % ep_size:
        raise ConfigError("parallel.ep_size", ep_size, f"must divide the world size ({W})")
    td = datetime.timedelta(seconds=timeout or timeout_s())
    out = ParallelGroups(world_size=W, rank=rank, ep_size=ep_size)
    out.dp = dist.new_group(list(range(W)), timeout=td)
    for i in range(W // ep_size):  # every rank creates every group, in the same order
        ranks = list(range(i * ep_size, (i + 1) * ep_size))
        g = dist.new_group(ranks, timeout=td)
        if rank in ranks:
            out.ep = g
    for j in range(ep_size):
        ranks = list(range(j, W, ep_size))
        g = dist.new_group(ranks, timeout=td)
        if rank in ranks:
            out.edp = g
    return out


def split_groups(size: int, *, timeout: float | None = None) -> ParallelGroups:
    """Cut the world into independent sub-worlds of ``size`` consecutive ranks, each with EP over all of
    its ranks (collective). Tests use it to run several EP sizes, or a rerun, in one set of processes."""
    W, rank = dist.get_world_size(), dist.get_rank()
    if W % size:
        raise ConfigError("size", size, f"must divide the world size ({W})")
    td = datetime.timedelta(seconds=timeout or timeout_s())
    mine = None
    for i in range(W // size):
        g = dist.new_group(list(range(i * size, (i + 1) * size)), timeout=td)
        if i == rank // size:
            mine = g
    return ParallelGroups(world_size=size, rank=rank % size, ep_size=size, ep=mine, edp=None, dp=mine)


def group_size(group: dist.ProcessGroup | None) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)
