"""Workers for the multi-process trainer tests (resharding, reliability.md §4.3 C4/C5): resume a run
directory at a given EP size, re-save the restored step, then train on."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from moesaic.config import to_dict
from moesaic.parallel.groups import ParallelGroups, build_groups
from moesaic.parallel.trainer import DistributedTrainer
from moesaic.run_config import load_run_config


def copy_run(src: str | Path, dst: str | Path, step_dir: str) -> None:
    """A fresh run directory holding one published checkpoint of ``src``."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(src) / step_dir, dst / step_dir)
    (dst / "LATEST").write_text(step_dir + "\n")


def resume_worker(rank: int, world: int, data: dict[str, Any], out: str, resave: bool,
                  max_steps: int) -> dict[str, Any]:
    """Resume ``out`` (or start) at EP = world, optionally re-save the restored step, train to ``max_steps``."""
    data = {**data, "parallel": {"ep_size": world}, "train": {**data["train"], "max_steps": max_steps}}
    cfg = load_run_config(data=data)
    groups = build_groups(world) if dist.is_initialized() else ParallelGroups()
    tr = DistributedTrainer(cfg, out, resume=True, groups=groups)
    start = tr.step
    if resave and start > 0:
        tr.save()  # the restored state, re-gathered at this EP size (collective)
    code = tr.run()
    return {"start": start, "code": code, "step": tr.step, "summary": tr.summary,
            "config": to_dict(cfg)["parallel"]}
