"""Step time of the dense-gradient reduction: DDP (the trainer's ExpertDataParallel strategy) against the flat
SUM all-reduce after backward that it replaced, on 4 local gloo processes (EP=2), steps alternating between two
identical models so load from other processes hits both alike. Regression toy model of
moesaic.train.ep_equivalence (d_model 128, 8 experts, 16 x 64 tokens per step).

Usage: ``python benchmarks/ddp_vs_flat_allreduce.py`` (prints rank 0's median step time of each, 35 steps).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from moesaic.distributed.collectives import all_reduce_sum
from moesaic.distributed.expert_parallel import apply_expert_parallel_, global_count, is_expert_param
from moesaic.distributed.groups import ParallelGroups, build_groups
from moesaic.distributed.launch import spawn
from moesaic.distributed.strategy import ExpertDataParallel
from moesaic.train.ep_equivalence import Case, build_model, global_batch
from moesaic.train.exact_aux import global_aux


def flat_reduce(model: nn.Module, groups: ParallelGroups) -> None:
    """The replaced reduction: expert gradients over the EDP group, the rest over the DP group, one flat
    all-reduce each."""
    kinds = is_expert_param(model)
    for expert, group in ((True, groups.edp), (False, groups.dp)):
        ps = [p for n, p in model.named_parameters() if kinds[n] == expert and p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in ps if p.grad is not None])
        all_reduce_sum(flat, group)
        start = 0
        for p in ps:
            assert p.grad is not None
            p.grad.copy_(flat[start:start + p.numel()].view_as(p))
            start += p.numel()


def worker(rank: int, world: int) -> dict[str, list[float]]:
    groups = build_groups(2)
    case = Case(dtype="float32", batch=16, seq=64, d_model=128, d_ff=256, num_experts=8)
    W, r = groups.world_size, groups.rank
    setups = {}
    for name in ("ddp", "flat"):
        model = build_model(case)
        strategy = ExpertDataParallel(groups)
        if name == "ddp":
            forward = strategy.prepare(model)
        else:
            forward = apply_expert_parallel_(model, groups.ep, batch_group=groups.dp)
        setups[name] = (model, forward, strategy)
    aux = global_aux(groups.dp)
    times: dict[str, list[float]] = {"ddp": [], "flat": []}
    per = case.batch // W
    for step in range(40):
        x, y, mask = global_batch(case, step, W)
        x, y, mask = x[r * per:(r + 1) * per], y[r * per:(r + 1) * per], mask[r * per:(r + 1) * per]
        for name in ("ddp", "flat") if step % 2 == 0 else ("flat", "ddp"):
            model, forward, strategy = setups[name]
            t0 = time.perf_counter()
            pred = forward(x, mask=mask)
            n = global_count(int(mask.sum()), groups.dp)
            loss = (((pred - y) ** 2).squeeze(-1) * mask).sum() / n + aux(model)
            loss.backward()
            if name == "ddp":
                strategy.finish_backward(model)
            else:
                flat_reduce(model, groups)
            model.zero_grad(set_to_none=True)
            if step >= 5:
                times[name].append(time.perf_counter() - t0)
    return times


if __name__ == "__main__":
    res = spawn(worker, 4)
    for k in ("ddp", "flat"):
        print(f"{k}: median {statistics.median(res[0][k]) * 1000:.2f} ms per step (rank 0, 35 steps)")
