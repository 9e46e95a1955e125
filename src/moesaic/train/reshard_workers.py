"""Workers for the multi-process trainer tests (resharding, docs/parallel.md "Checkpoints with global expert
keys"): resume a run directory at a given EP size, re-save the restored step, then train on."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from moesaic.distributed.groups import ParallelGroups, build_groups
from moesaic.distributed.strategy import ExpertDataParallel
from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer


def copy_run(src: str | Path, dst: str | Path, step_dir: str) -> None:
    """A fresh run directory holding one published checkpoint of ``src``."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(src) / step_dir, dst / step_dir)
    (dst / "LATEST").write_text(step_dir + "\n")


def resume(data: dict[str, Any], out: str | Path, ep_size: int, groups: ParallelGroups, resave: bool,
           max_steps: int) -> dict[str, Any]:
    """Resume ``out`` (or start) at ``ep_size``, optionally re-save the restored step, train to ``max_steps``."""
    data = {**data, "parallel": {"ep_size": ep_size}, "train": {**data["train"], "max_steps": max_steps}}
    tr = Trainer(load_run_config(data=data), out, resume=True, strategy=ExpertDataParallel(groups))
    start = tr.step
    if resave and start > 0:
        tr.save()  # the restored state, re-gathered at this EP size (collective)
    code = tr.run()
    return {"start": start, "code": code, "step": tr.step}


def reshard_worker(rank: int, world: int, data: dict[str, Any], root: str, step_dir: str) -> list[dict[str, Any]]:
    """On 4 processes: EP=2 (x2 data-parallel replicas) from scratch for 3 steps; then EP=1 (rank 0
    alone), EP=4 and back to EP=2, each resuming the previous phase's checkpoint, re-saving the restored
    step and training one more step. Run directories ``ep2``, ``ep1``, ``ep4``, ``back`` under ``root``."""
    root_p = Path(root)
    out = [resume(data, root_p / "ep2", 2, build_groups(2), False, 3)]
    prev = "ep2"
    for name, ep in (("ep1", 1), ("ep4", 4), ("back", 2)):
        if rank == 0:
            copy_run(root_p / prev, root_p / name, step_dir)
        dist.barrier()
        if ep == 1:
            if rank == 0:
                out.append(resume(data, root_p / name, 1, ParallelGroups(), True, 4))
            dist.barrier()
        else:
            out.append(resume(data, root_p / name, ep, build_groups(ep), True, 4))
        prev = name
    return out
