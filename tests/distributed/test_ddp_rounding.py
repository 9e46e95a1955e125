"""DDP (the strategy's reduction of the dense gradients) against the hand-written flat all-reduce it replaced,
both against float64: on 4 gloo ranks (EP=2, so dense gradients are summed over 4 ranks and expert gradients
over 2), float32 gradients of both reductions sit within float32 rounding of the float64 gradients, and the
two differ from each other by no more than a reordered 4-term float32 sum can."""

import dataclasses

import pytest
import torch

from moesaic.distributed.collectives import all_reduce_sum
from moesaic.distributed.expert_parallel import apply_expert_parallel_, global_count, is_expert_param
from moesaic.distributed.groups import build_groups
from moesaic.distributed.launch import spawn
from moesaic.train.ep_equivalence import Case, build_model, global_batch, run
from moesaic.train.exact_aux import global_aux

CASE = Case(dtype="float32", steps=1, router={"z_loss_coef": 1e-3}, batch=8, seq=8)
EPS32 = torch.finfo(torch.float32).eps


def _hand_written(case, groups):
    """One step's gradients with the pre-DDP reduction: one flat SUM all-reduce per group after backward."""
    W, r = groups.world_size, groups.rank
    model = build_model(case)
    apply_expert_parallel_(model, groups.ep, batch_group=groups.dp)
    x, y, mask = global_batch(case, 0, W)
    per = case.batch // W
    x, y, mask = x[r * per:(r + 1) * per], y[r * per:(r + 1) * per], mask[r * per:(r + 1) * per]
    pred = model(x, mask=mask)
    task = (((pred - y) ** 2).squeeze(-1) * mask).sum() / max(global_count(int(mask.sum()), groups.dp), 1.0)
    (task + global_aux(groups.dp)(model)).backward()
    kinds = is_expert_param(model)
    for expert, group in ((True, groups.edp), (False, groups.dp)):
        ps = [p for n, p in model.named_parameters() if kinds[n] == expert]
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        all_reduce_sum(flat, group)
        start = 0
        for p in ps:
            p.grad.copy_(flat[start:start + p.numel()].view_as(p))
            start += p.numel()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, world):
    groups = build_groups(2)
    ddp = run(CASE, groups)
    return {"ddp": ddp["grads0"], "hand": _hand_written(CASE, groups), "shard": ddp["shard"],
            "experts": ddp["expert_names"]}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ddp_and_hand_written_reduction_are_both_float32_rounding_of_float64():
    ref = run(dataclasses.replace(CASE, dtype="float64"))["grads0"]
    res = spawn(_worker, 4)
    bitwise = True
    for r in range(4):
        off, L = res[r]["shard"]
        for n, want in ref.items():
            if n in res[r]["experts"]:
                want = want[off:off + L]
            scale = float(want.abs().max())
            a, b = res[r]["ddp"][n].double(), res[r]["hand"][n].double()
            assert float((a - want).abs().max()) <= 1e-5 * scale, (r, n)  # float32 forward/backward rounding
            assert float((b - want).abs().max()) <= 1e-5 * scale, (r, n)
            assert float((a - b).abs().max()) <= 4 * EPS32 * 4 * scale, (r, n)  # a reordered 4-term sum at most
            bitwise &= torch.equal(a, b)
    print(f"DDP vs hand-written flat all-reduce bitwise equal on every rank: {bitwise}")
