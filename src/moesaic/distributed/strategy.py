"""How one training step is spread over processes: a strategy object the trainer is given.

:class:`SingleProcess` is the trivial strategy. :class:`ExpertDataParallel` shards the experts over the
expert-parallel group (:func:`~moesaic.distributed.expert_parallel.apply_expert_parallel_`) and splits every
micro-batch by sequence over all ranks (docs/parallel.md). Each rank's objective is its *share* of the
one-process objective, so gradients are SUM-reduced, never averaged:

* every parameter except the sharded experts goes through :class:`torch.nn.parallel.DistributedDataParallel`
  over the data-parallel group, with a comm hook that sums (DDP's default divides by the world size) and
  ``no_sync`` on every micro-batch but the last, so the reduction overlaps the last backward;
* expert parameters are summed over the expert-data-parallel group after the backward (their gradient
  already holds the whole EP group's tokens through the all-to-all backward). DDP takes one process group
  per wrapped module, so the experts, which need another group, are excluded from it
  (``_set_params_and_buffers_to_ignore_for_model``, the hook PyTorch's own composable APIs use) and reduced
  with one flat all-reduce per dtype.

A trainer calls, per step: :meth:`Strategy.local_part` on each micro-batch, the forwards and backwards
through the module :meth:`Strategy.prepare` returned (under :meth:`Strategy.no_sync` but for the last
micro-batch), then :meth:`Strategy.finish_backward`, :meth:`Strategy.clip_grad_norm_` and the optimizer.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from moesaic.core.errors import ConfigError
from moesaic.distributed import expert_state
from moesaic.distributed.collectives import all_reduce_sum
from moesaic.distributed.expert_parallel import apply_expert_parallel_, is_expert_param
from moesaic.distributed.groups import ParallelGroups, build_groups, group_size


class SingleProcess:
    """One process: nothing is split, reduced or sharded."""

    world_size = 1
    rank = 0
    is_writer = True
    #: The group a batch is split over (the aux statistics are summed over it); None: this process.
    batch_group: Any = None

    def check_batch(self, batch_size: int, grad_accum: int) -> None:
        """Raise :class:`ConfigError` when a micro-batch cannot be split evenly over the ranks."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """Apply the parallelism to ``model`` (in place); returns the module forwards run through."""
        return model

    def local_part(self, micro: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's sequences of a micro-batch of the global batch."""
        return micro

    def no_sync(self, wrapped: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """Context for the backward of every micro-batch but the last: no gradient reduction yet."""
        return contextlib.nullcontext()

    def finish_backward(self, model: nn.Module) -> None:
        """Reductions the wrapper does not do itself (after the last micro-batch's backward)."""

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def sum_(self, t: Tensor) -> Tensor:
        """In-place sum of a logging tensor over the ranks."""
        return t

    def any_(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (the SIGTERM stop: every rank saves the same step)."""
        return flag

    # ------------------------------------------------------------------------------- checkpoints
    def gather_model_state(self, model: nn.Module) -> dict[str, Tensor]:
        return expert_state.gather_model_state(model)

    scatter_model_state: Any = None  # the checkpoint's plain copy

    def gather_optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]
                               ) -> dict[str, Any]:
        return state

    def scatter_optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]
                                ) -> dict[str, Any]:
        return state

    def checkpoint_extra_files(self, model: nn.Module, state: dict[str, Tensor]) -> dict[str, bytes]:
        return {}


def _sum_hook(group: dist.ProcessGroup, bucket: Any) -> torch.futures.Future[Tensor]:
    """DDP comm hook: SUM the bucket (a ``dist.GradBucket``) over ``group`` (every rank's loss is its share of
    the global one)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    assert work is not None
    fut: torch.futures.Future[list[Tensor]] = work.get_future()
    return fut.then(lambda f: f.value()[0])


# DDP checks the hook's annotations at registration; postponed (string) annotations would fail its check
_sum_hook.__annotations__ = {"group": dist.ProcessGroup, "bucket": dist.GradBucket,
                             "return": torch.futures.Future[Tensor]}


def _reduce_flat(params: list[nn.Parameter], group: dist.ProcessGroup | None) -> None:
    if not params or group_size(group) == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        assert p.grad is not None
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps if p.grad is not None])
        all_reduce_sum(flat, group)
        start = 0
        for p in ps:
            assert p.grad is not None
            n = p.grad.numel()
            p.grad.copy_(flat[start:start + n].view_as(p.grad))
            start += n


class ExpertDataParallel(SingleProcess):
    """Experts sharded over ``groups.ep``, every micro-batch split by sequence over all ranks (``groups.dp``)."""

    def __init__(self, groups: ParallelGroups):
        self.groups = groups
        self.world_size, self.rank = groups.world_size, groups.rank
        self.is_writer = groups.rank == 0
        self.batch_group = groups.dp

    def check_batch(self, batch_size: int, grad_accum: int) -> None:
        per_micro = batch_size // grad_accum
        if per_micro % self.world_size:
            raise ConfigError("train.batch_size", batch_size, f"batch_size / grad_accum ({per_micro}) must be "
                              f"divisible by the world size ({self.world_size})")

    def prepare(self, model: nn.Module) -> nn.Module:
        apply_expert_parallel_(model, self.groups.ep, batch_group=self.groups.dp)
        if group_size(self.groups.dp) == 1:
            return model
        experts = [n for n, e in is_expert_param(model).items() if e]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts)
        # find_unused_parameters: a rank may route no token through a layer's router (zero valid tokens)
        ddp = DistributedDataParallel(model, process_group=self.groups.dp, forward_sync_buffers=False,
                                      find_unused_parameters=True)
        ddp.register_comm_hook(self.groups.dp, _sum_hook)
        return ddp

    def local_part(self, micro: dict[str, Tensor]) -> dict[str, Tensor]:
        per = micro["input_ids"].shape[0] // self.world_size
        return {k: v[self.rank * per:(self.rank + 1) * per] for k, v in micro.items()}

    def no_sync(self, wrapped: nn.Module) -> contextlib.AbstractContextManager[Any]:
        if isinstance(wrapped, DistributedDataParallel):
            return wrapped.no_sync()
        return contextlib.nullcontext()

    def gradient_groups(self, model: nn.Module) -> dict[str, list[str]]:
        """Trainable parameter names per reduction group: ``edp`` (experts), ``dp`` (everything else, DDP)."""
        kinds = is_expert_param(model)
        named = [n for n, p in model.named_parameters() if p.requires_grad]
        return {"edp": [n for n in named if kinds[n]], "dp": [n for n in named if not kinds[n]]}

    def finish_backward(self, model: nn.Module) -> None:
        kinds = is_expert_param(model)
        _reduce_flat([p for n, p in model.named_parameters() if p.requires_grad and kinds[n]], self.groups.edp)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        """Clip by the global norm: dense gradients are replicated, expert gradients sharded over EP."""
        kinds = is_expert_param(model)
        dense_sq = torch.zeros((), dtype=torch.float64)
        expert_sq = torch.zeros((), dtype=torch.float64)
        grads = []
        for n, p in model.named_parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            sq = p.grad.detach().double().square().sum().cpu()
            if kinds[n]:
                expert_sq += sq
            else:
                dense_sq += sq
        all_reduce_sum(expert_sq, self.groups.ep)
        total = float((dense_sq + expert_sq).sqrt())
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.detach().mul_(coef)
        return total

    def sum_(self, t: Tensor) -> Tensor:
        return all_reduce_sum(t, self.groups.dp)

    def any_(self, flag: bool) -> bool:
        t = torch.tensor([float(flag)], dtype=torch.float64)
        if group_size(self.groups.dp) > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.groups.dp)
        return bool(t[0] > 0)

    scatter_model_state = staticmethod(expert_state.scatter_model_state)

    def gather_optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]
                               ) -> dict[str, Any]:
        return expert_state.gather_optimizer_state(model, opt, state)

    def scatter_optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]
                                ) -> dict[str, Any]:
        return expert_state.scatter_optimizer_state(model, opt, state)

    def checkpoint_extra_files(self, model: nn.Module, state: dict[str, Tensor]) -> dict[str, bytes]:
        return {"experts.json": expert_state.experts_manifest(model, state)}


Strategy = SingleProcess


def strategy_from_config(ep_size: int) -> SingleProcess:
    """:class:`ExpertDataParallel` over every process when ``torch.distributed`` is initialised with more
    than one rank (torchrun), else :class:`SingleProcess` (``ep_size`` must then be 1)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ExpertDataParallel(build_groups(ep_size))
    if ep_size != 1:
        raise ConfigError("parallel.ep_size", ep_size, "needs torch.distributed (launch with torchrun or --nproc)")
    return SingleProcess()

