"""The training loop: AdamW, warm-up + cosine, exact gradient accumulation, clipping, bf16 autocast,
evaluation, routing statistics, metrics, atomic checkpoints, bit-exact resume and SIGTERM handling.

``Trainer(cfg, out_dir, resume=..., strategy=...)`` then ``run()`` (returns 0, or 143 after a
SIGTERM-triggered save). One step (docs/training.md, "The training step"): the batch is cut into
``grad_accum`` micro-batches, the strategy keeps this rank's sequences of each
(:mod:`moesaic.distributed.strategy`: one process, or expert + data parallelism), the objective
(``train.objective``, :mod:`moesaic.train.objectives`) returns each micro-batch's loss pieces, and the aux
losses are exact shares of the step's (:mod:`moesaic.train.exact_aux`), so the step loss of
:mod:`moesaic.train.loss` does not depend on the split. Resuming restores model, optimizer, step (the
schedule is a function of it), data position and RNG, so the continued run is bitwise identical to an
uninterrupted one (fp32/fp64, CPU, same thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch

import moesaic
from moesaic.core.config import dump_yaml, loads_yaml, parse, to_dict
from moesaic.core.errors import CheckpointMismatchError, ConfigError, NonFiniteInputError, NonFiniteTrainingError
from moesaic.distributed.strategy import SingleProcess, strategy_from_config
from moesaic.train import checkpoint as ckpt
from moesaic.train.aux_accumulation import AuxAccumulation
from moesaic.train.exact_aux import AuxFn
from moesaic.train.faults import fault_point
from moesaic.train.loss import count_tokens, count_valid
from moesaic.train.lr_schedule import lr_factor
from moesaic.train.memory_check import check_model_fits
from moesaic.train.metrics import MetricsWriter, RoutingStats
from moesaic.train.nonfinite import NonFiniteGuard
from moesaic.train.objectives.base import LossPieces, ObjectiveContext
from moesaic.train.optim import build_adamw
from moesaic.train.progress import NoMetrics, Progress, log_line
from moesaic.train.run_folder import claim_run_folder, discard_new_run_folder
from moesaic.train.task import eval_batch_size, evaluate, select_task

EXIT_PREEMPTED = 143
#: Config fields that may change on resume (logging, cadence, length); anything else is a mismatch.
RESUME_ALLOWED = {f"train.{k}" for k in ("max_steps", "log_every", "eval_every", "save_every", "keep_last",
                                          "progress", "tensorboard", "threads", "eval_at_end", "save_at_end",
                                          "handle_sigterm", "eval_batch_size", "on_nonfinite")}
RESUME_ALLOWED |= {"parallel.ep_size"}  # checkpoints hold global expert keys (distributed/expert_state.py)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def same_tokenizer(a: str, b: str) -> bool:
    """Two tokenizer JSON texts describe the same tokenizer (key order and spacing aside)."""
    try:
        return bool(json.loads(a) == json.loads(b))
    except ValueError:
        return a == b


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"  # per process: ranks of one run share the folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError("--out", str(out), f"output folder is not writable ({e.strerror or e})") from None


class Trainer:
    def __init__(self, cfg: Any, out_dir: str | Path, resume: bool = False, log: Callable[[str], None] | None = None,
                 strategy: SingleProcess | None = None, init_state: dict[str, torch.Tensor] | None = None,
                 init_from: str = "init state"):
        """``init_state``: weights to start from (``moesaic train --init-from``: a converted checkpoint or a
        Hugging Face folder), loaded into the config's model by name; a name or shape that does not fit raises
        :class:`~moesaic.core.errors.CheckpointMismatchError` naming ``init_from``. A resumed checkpoint wins."""
        created = not Path(out_dir).exists()
        try:
            self._setup(cfg, out_dir, resume, log, strategy, init_state, init_from)
        except BaseException:
            if created and getattr(self, "is_writer", False):
                discard_new_run_folder(Path(out_dir))  # a failed start leaves no folder it created behind
            raise

    def _setup(self, cfg: Any, out_dir: str | Path, resume: bool, log: Callable[[str], None] | None,
               strategy: SingleProcess | None, init_state: dict[str, torch.Tensor] | None,
               init_from: str) -> None:
        from moesaic.train.run_config import RunConfig

        self.strategy = strategy if strategy is not None else strategy_from_config(cfg.parallel.ep_size)
        self.is_writer = self.strategy.is_writer
        self.out = Path(out_dir)
        if log is None:
            log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if self.is_writer else (lambda msg: None)
        self.log = log
        check_writable(self.out)
        if self.is_writer:
            claim_run_folder(self.out)  # never write into a user's folder that no run wrote (train/run_folder.py)
        tc = cfg.train
        self.strategy.check_batch(tc.batch_size, tc.grad_accum)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.data = cfg.data.build()
        self.task = select_task(cfg, self.data)  # the task the model config declares (train/task.py)
        vocab = getattr(self.data, "vocab_size", None)  # None for data without a tokenizer (images)
        if vocab is None:
            pass
        elif getattr(cfg.model, "vocab_size", 0) is None:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
        elif getattr(cfg.model, "vocab_size", vocab) < vocab:
            raise ConfigError("model.vocab_size", cfg.model.vocab_size, f"must be >= the tokenizer's ({vocab})")
        self.cfg: RunConfig = cfg
        self.tc = tc
        self.dtype = torch.float64 if tc.dtype == "float64" else torch.float32
        self.objective = tc.objective.build()
        check_model_fits(cfg.model, self.dtype)  # before allocating (train/memory_check.py)
        torch.manual_seed(tc.seed)
        self.model = cfg.model.build().to(self.dtype)
        if init_state is not None:
            ckpt.load_model_state(self.model, init_state, f"--init-from {init_from}")
        self.forward_model = self.strategy.prepare(self.model)  # shards experts, wraps in DDP (or itself)
        self.objective.setup(self.model, self.task)
        self.aux_acc = AuxAccumulation(self.model, tc.aux_accumulation, tc.grad_accum, self.strategy.batch_group)
        self.opt = build_adamw(self.model, tc.lr, (tc.beta1, tc.beta2), tc.eps, tc.weight_decay)
        self.loader = self.data.loader(tc.seed)
        self.eval_data = self.data.eval_batches(eval_batch_size(tc))
        self.step = 0
        self.stats = RoutingStats(self.model)
        self.guard = NonFiniteGuard(self.model)  # names the layer of a NaN/inf step (train/nonfinite.py)
        self._rolled_back: set[int] = set()
        self._stop = False
        self.metrics: MetricsWriter | NoMetrics = MetricsWriter(self.out, tc.tensorboard) if self.is_writer \
            else NoMetrics()
        existing = ckpt.list_steps(self.out)
        if resume:
            found = ckpt.latest_valid(self.out, warn=lambda m: self.log(f"warning: {m}"))
            if found is not None:
                self.restore(found)
            else:
                self.log(f"no valid checkpoint in {self.out}; starting from step 0")
                self.metrics.truncate_after(0)
        elif existing:
            raise ConfigError("--out", str(self.out), "already holds checkpoints; pass --resume to continue "
                              "or choose another output folder")
        else:
            self.metrics.truncate_after(0)  # records of an earlier run that never saved
        if self.is_writer:
            (self.out / "config.yaml").write_text(dump_yaml(self.cfg))

    # ------------------------------------------------------------------------------ checkpointing
    def save(self) -> Path:
        t0 = time.perf_counter()
        tok = getattr(self.data, "tokenizer", None)
        model_state = self.strategy.gather_model_state(self.model)  # collective under expert parallelism
        optimizer_state = self.strategy.gather_optimizer_state(self.model, self.opt, self.opt.state_dict())
        if not self.is_writer:
            return self.out
        path = ckpt.save_checkpoint(
            self.out, self.step, config_yaml=dump_yaml(self.cfg),
            extra_files=self.strategy.checkpoint_extra_files(self.model, model_state),
            model_state=model_state, optimizer_state=optimizer_state,
            trainer_state={"step": self.step, "data": self.loader.state_dict(),
                           "schedule": {"kind": self.tc.lr_schedule, "step": self.step}},
            rng_state={"torch_cpu": torch.get_rng_state(),
                       "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            tokenizer_json=tok.to_json() if tok is not None else None)
        ckpt.prune(self.out, self.tc.keep_last, path)
        self.log(f"saved {path} in {time.perf_counter() - t0:.2f}s")
        return path

    def restore(self, path: Path) -> None:
        from moesaic.train.run_config import RunConfig

        files = ckpt.load_files(path, training=True)
        tok = getattr(self.data, "tokenizer", None)
        if tok is not None and "tokenizer_json" in files and not same_tokenizer(tok.to_json(), files["tokenizer_json"]):
            raise CheckpointMismatchError(f"{path}: the data's tokenizer differs from the checkpoint's tokenizer.json "
                                          f"(data.kind {self.cfg.data.kind}; the text or data.tokenizer_file changed)")
        saved = parse(RunConfig, loads_yaml(files["config_yaml"], "config.yaml"), "")
        a, b = _flatten(to_dict(saved)), _flatten(to_dict(self.cfg))
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUME_ALLOWED)
        if diff:
            raise CheckpointMismatchError(f"{path}: the config differs from the checkpoint's in {', '.join(diff)}")
        ckpt.load_model_state(self.model, files["model_state"], str(path), self.strategy.scatter_model_state)
        try:
            self.opt.load_state_dict(self.strategy.scatter_optimizer_state(self.model, self.opt,
                                                                           files["optimizer_state"]))
        except (ValueError, KeyError) as e:
            raise CheckpointMismatchError(f"{path}: optimizer state does not fit: {e}") from None
        st = files["trainer_state"]
        self.step = int(st["step"])
        self.loader.load_state_dict(st["data"])
        torch.set_rng_state(files["rng_state"]["torch_cpu"])
        if torch.cuda.is_available() and files["rng_state"].get("cuda"):
            torch.cuda.set_rng_state_all(files["rng_state"]["cuda"])
        self.metrics.truncate_after(self.step)
        self.log(f"resumed from {path} at step {self.step}")

    # ---------------------------------------------------------------------------------- stepping
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.tc.autocast == "bf16":
            dev = next(self.model.parameters()).device.type
            return torch.autocast(device_type=dev, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _objective(self, mb: dict[str, torch.Tensor], aux: AuxFn) -> LossPieces:
        ctx = ObjectiveContext(aux, self._autocast, self.step)
        pieces: LossPieces = self.objective(self.forward_model, mb, self.task, ctx)
        return pieces

    def accumulate(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Forward and backward of ``batch`` (the global step batch) split into ``grad_accum`` micro-batches,
        each cut to this rank's sequences; gradients are those of the step objective of train/loss.py,
        reduced over the ranks. Returns the step's task loss, aux loss and valid targets."""
        ga = self.tc.grad_accum
        B = batch["labels"].shape[0]  # every per-example tensor is split (input_ids, pixel_values, task_id, ...)
        keys = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B]
        chunks = [{k: batch[k].chunk(ga)[i] for k in keys} for i in range(ga)]
        micro = [self.strategy.local_part(c) for c in chunks]
        N = count_valid(batch["labels"])  # the global batch is known on every rank: no collective needed
        T = count_tokens(batch)
        logged = torch.zeros(2, dtype=torch.float64)
        if N > 0:
            aux_fns, shares = self.aux_acc.collectors(micro, self._objective)
            for i, mb in enumerate(micro):
                last = i == ga - 1
                with contextlib.nullcontext() if last else self.strategy.no_sync(self.forward_model):
                    pieces = self._objective(mb, aux_fns[i])
                    w = 1.0 if shares else count_tokens(chunks[i]) / T  # exact shares need no weighting
                    loss = pieces.loss_sum / N + w * pieces.aux
                    loss.backward()
                logged[0] += pieces.task_loss_sum.detach().double() / N
                logged[1] += pieces.aux.detach().double() * w
                self.stats.update()
            self.strategy.finish_backward(self.model)
        self.strategy.sum_(logged)
        return {"loss": float(logged[0]), "aux_loss": float(logged[1]), "tokens": N}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step: lr from the schedule, :meth:`accumulate`, clip, AdamW, step hooks. An
        all-padding batch gives loss 0 and no update."""
        fault_point("step.begin", step=self.step, rank=self.strategy.rank)
        for g in self.opt.param_groups:
            g["lr"] = self.tc.lr * lr_factor(self.step, self.tc)
        self.guard.reset()
        router_error = None
        try:
            out: dict[str, float] = self.accumulate(batch)
        except NonFiniteInputError as e:  # a router saw NaN/inf before the loss did: same policy
            out, router_error = {"loss": float("nan"), "aux_loss": float("nan"), "tokens": 0}, str(e)
        fault_point("step.after_backward", step=self.step, rank=self.strategy.rank)
        bad = self.guard.check(out["loss"], router_error)
        if bad is not None and self._on_nonfinite(bad):
            out["rolled_back"] = 1.0
            return out
        if out["tokens"] > 0 and bad is None:
            if self.tc.grad_clip > 0:
                out["grad_norm"] = self.strategy.clip_grad_norm_(self.model, self.tc.grad_clip)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        if bad is None:
            moesaic.on_optimizer_step(self.model, self.step)
        out["lr"] = self.opt.param_groups[0]["lr"]
        self._stop = self.strategy.any_(self._stop)
        return out

    def _on_nonfinite(self, where: str) -> bool:
        """``train.on_nonfinite`` (moesaic.train.nonfinite): raise, skip the update (False) or roll back to
        the newest valid checkpoint (True)."""
        step, policy = self.step + 1, self.tc.on_nonfinite
        msg = f"step {step}: non-finite {where} (train.on_nonfinite={policy})"
        self.opt.zero_grad(set_to_none=True)
        if policy == "skip_step" and not where.startswith("weight "):
            self.log(f"warning: {msg}: update skipped")
            return False
        if policy == "rollback" and step not in self._rolled_back:
            found = ckpt.latest_valid(self.out, warn=lambda m: self.log(f"warning: {m}"))
            if found is not None:
                self._rolled_back.add(step)
                self.log(f"warning: {msg}: rolling back to {found}")
                self.restore(found)
                return True
            msg += ": no checkpoint to roll back to"
        elif policy != "stop":
            msg += ": a non-finite weight cannot be skipped" if policy == "skip_step" else ": failed again"
        raise NonFiniteTrainingError(msg)

    def evaluate(self) -> dict[str, float]:
        """The task's metrics on the eval batches: val_loss and val_ppl (LM) or val_accuracy (classifier)."""
        return evaluate(self.model, self.task, self.eval_data, self._autocast)

    # -------------------------------------------------------------------------------------- loop
    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002
        self._stop = True

    def run(self) -> int:
        tc = self.tc
        old = signal.signal(signal.SIGTERM, self._on_sigterm) if tc.handle_sigterm else None
        self.model.train()
        self.summary: dict[str, Any] = {"start_step": self.step}
        win_tokens, win_time, all_tokens, all_time = 0, 0.0, 0, 0.0
        last: dict[str, Any] = {}
        progress = Progress(tc.max_steps, self.step, enabled=tc.progress)
        code = 0
        try:
            while self.step < tc.max_steps:
                batch = self.loader.next_batch(tc.batch_size)
                t0 = time.perf_counter()
                r = self.train_step(batch)
                dt = time.perf_counter() - t0
                if "rolled_back" in r:
                    continue
                n_tok = self.task.throughput_tokens(batch, int(r["tokens"]))
                win_tokens, win_time = win_tokens + n_tok, win_time + dt
                all_tokens, all_time = all_tokens + n_tok, all_time + dt
                rec: dict[str, Any] = {"step": self.step, "loss": r["loss"], "aux_loss": r["aux_loss"],
                                       "lr": r["lr"]}
                if "grad_norm" in r:
                    rec["grad_norm"] = r["grad_norm"]
                end = self.step == tc.max_steps
                logged = self.step % tc.log_every == 0 or self.step == 1 or end
                if logged:
                    rec["tokens_per_s"] = win_tokens / win_time if win_time > 0 else 0.0
                    rec["routing"] = self.stats.summary()
                    win_tokens, win_time = 0, 0.0
                    if progress.bar is None:
                        self.log(log_line(rec, tc.max_steps))
                self.stats.reset()
                if self.step % tc.eval_every == 0 or (end and tc.eval_at_end):
                    rec.update(self.evaluate())
                    logged = True
                    self.log(f"step {self.step}: {self.task.eval_line(rec)}")
                if logged:
                    self.metrics.write(rec)
                last = rec
                progress.update(self.step, r["loss"], all_tokens / all_time if all_time else 0.0)
                if self.step % tc.save_every == 0 or (end and tc.save_at_end) or self._stop:
                    self.save()
                if self._stop:
                    self.log(f"SIGTERM: saved at step {self.step}, exiting with {EXIT_PREEMPTED}")
                    code = EXIT_PREEMPTED
                    break
        finally:
            progress.close()
            self.metrics.close()
            if old is not None:
                signal.signal(signal.SIGTERM, old)
        self.summary.update(last, steps=self.step, tokens_per_s=all_tokens / all_time if all_time else 0.0,
                            train_time_s=all_time, exit=code)
        return code


