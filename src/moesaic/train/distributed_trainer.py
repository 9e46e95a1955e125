"""Multi-process training: the :class:`~moesaic.train.trainer.Trainer` under torch.distributed.

Every rank builds the same model (same seed), then :func:`apply_expert_parallel_` shards the experts
over its expert-parallel group (``parallel.ep_size``; the remaining factor of the world size replicates
them: expert-data parallelism). Every rank reads the same global batch from the deterministic loader and
keeps its part: the batch is cut into ``grad_accum`` micro-batches exactly as in one process, and each
micro-batch into ``world_size`` equal slices of sequences. The step objective is the one-process
objective of :mod:`moesaic.train.loss` with *global* counts (valid targets ``N``, routed tokens ``t_m``
and ``T`` summed over the ranks), and the aux losses are each rank's share of the global micro-batch's
(:mod:`moesaic.distributed.expert_parallel`); gradients are SUM-reduced, so a step equals one process's.

Rank 0 writes metrics, config and checkpoints (global expert keys, :mod:`moesaic.distributed.expert_state`);
gathering the checkpoint is collective. Every process group has the ``MOESAIC_PG_TIMEOUT`` timeout (60 s):
if a rank dies, the others fail in their next collective instead of hanging, and since a save needs every
rank, no checkpoint is published after a failure. The SIGTERM stop flag is agreed on by all ranks every
step, so a preempted run saves the same step everywhere. ``MOESAIC_FAIL_RANK``/``MOESAIC_FAIL_STEP``
make one rank raise at the start of a step (failure tests).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

import moesaic
from moesaic.core.errors import ConfigError
from moesaic.distributed import expert_state
from moesaic.distributed.collectives import all_reduce_sum
from moesaic.distributed.expert_parallel import apply_expert_parallel_, is_expert_param, sync_gradients
from moesaic.distributed.groups import ParallelGroups, build_groups, group_size
from moesaic.train.loss import count_tokens, count_valid
from moesaic.train.thor import thor_lm_step
from moesaic.train.trainer import Trainer


class DistributedTrainer(Trainer):
    def __init__(self, cfg: Any, out_dir: Any, resume: bool = False, log: Any = None,
                 groups: ParallelGroups | None = None):
        self.groups = groups or build_groups(cfg.parallel.ep_size)
        W = self.groups.world_size
        per_micro = cfg.train.batch_size // cfg.train.grad_accum
        if per_micro % W:
            raise ConfigError("train.batch_size", cfg.train.batch_size,
                              f"batch_size / grad_accum ({per_micro}) must be divisible by the world size ({W})")
        self.is_writer = self.groups.rank == 0
        if not self.is_writer and log is None:
            log = lambda msg: None  # noqa: E731
        super().__init__(cfg, out_dir, resume=resume, log=log)
        self.gather_model_state = expert_state.gather_model_state
        self.scatter_model_state = expert_state.scatter_model_state

    # ------------------------------------------------------------------------------------- hooks
    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return apply_expert_parallel_(model, self.groups.ep, batch_group=self.groups.dp)

    def restore(self, path) -> None:
        self.scatter_model_state = expert_state.scatter_model_state
        super().restore(path)

    def gather_optimizer_state(self, state: dict) -> dict:
        return expert_state.gather_optimizer_state(self.model, self.opt, state)

    def scatter_optimizer_state(self, state: dict) -> dict:
        return expert_state.scatter_optimizer_state(self.model, self.opt, state)

    def checkpoint_extra_files(self, model_state: dict[str, torch.Tensor]) -> dict[str, bytes]:
        return {"experts.json": expert_state.experts_manifest(self.model, model_state)}

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip by the global norm: dense gradients are replicated, expert gradients sharded over EP."""
        kinds = is_expert_param(self.model)
        dense_sq = torch.zeros((), dtype=torch.float64)
        expert_sq = torch.zeros((), dtype=torch.float64)
        params = []
        for n, p in self.model.named_parameters():
            if p.grad is None:
                continue
            params.append(p)
            sq = p.grad.detach().double().square().sum()
            if kinds[n]:
                expert_sq += sq
            else:
                dense_sq += sq
        all_reduce_sum(expert_sq, self.groups.ep)
        total = float((dense_sq + expert_sq).sqrt())
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for p in params:
                p.grad.detach().mul_(coef)
        return total

    # ---------------------------------------------------------------------------------- stepping
    def accumulate(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        ga, g = self.tc.grad_accum, self.groups
        W, r = g.world_size, g.rank
        keys = [k for k in ("input_ids", "labels", "attention_mask") if batch.get(k) is not None]
        micro = []
        for i in range(ga):
            chunk = {k: batch[k].chunk(ga)[i] for k in keys}
            per = chunk["input_ids"].shape[0] // W
            micro.append({k: v[r * per:(r + 1) * per] for k, v in chunk.items()})
        N = count_valid(batch["labels"])  # the global batch is known on every rank: no collective needed
        T = count_tokens(batch)
        ce_total, aux_total = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        alpha = getattr(self.tc, "consistency_alpha", None)

        def forward(mb):
            if alpha is not None:  # THOR's two passes (moesaic.train.thor); random draws differ per rank
                th = thor_lm_step(self.model, mb, alpha, self._autocast)
                return th.ce1 + th.ce2 + alpha * th.cr, (th.ce1 + th.ce2) / 2, th.aux
            with self._autocast():
                out = self.model(mb["input_ids"], attention_mask=mb.get("attention_mask"))
            ce_sum, _ = self.task.loss_sum(out.logits, mb["labels"])
            return ce_sum, ce_sum, moesaic.collect_aux_losses(self.model)  # this rank's share (expert_parallel.py)

        if N > 0:
            with self.aux_acc.step(micro, forward) as aux_is_share:  # exact: shares of the global step's aux
                for i, mb in enumerate(micro):
                    self.aux_acc.next_micro()
                    obj_sum, ce_sum, aux = forward(mb)
                    w = 1.0 if aux_is_share else count_tokens({k: batch[k].chunk(ga)[i] for k in keys}) / T
                    loss = obj_sum / N + w * aux
                    loss.backward()
                    ce_total += ce_sum.detach().double() / N
                    aux_total += aux.detach().double() * w
                    self.stats.update()
            sync_gradients(self.model, g)
        logged = torch.stack([ce_total, aux_total])
        all_reduce_sum(logged, g.dp)
        return {"loss": float(logged[0]), "aux_loss": float(logged[1]), "tokens": N}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        fail_rank, fail_step = os.environ.get("MOESAIC_FAIL_RANK"), os.environ.get("MOESAIC_FAIL_STEP")
        if fail_rank is not None and int(fail_rank) == self.groups.rank and int(fail_step or 0) == self.step:
            raise RuntimeError(f"MOESAIC_FAIL_RANK: rank {self.groups.rank} fails at step {self.step} (test hook)")
        out = super().train_step(batch)
        stop = torch.tensor([float(self._stop)], dtype=torch.float64)
        if group_size(self.groups.dp) > 1:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=self.groups.dp)
        self._stop = bool(stop[0] > 0)
        return out
