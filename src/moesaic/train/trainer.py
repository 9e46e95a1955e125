"""The training loop: AdamW, warm-up + cosine, exact gradient accumulation, clipping, bf16 autocast,
evaluation, routing statistics, metrics, atomic checkpoints, bit-exact resume and SIGTERM handling.

``Trainer(cfg, out_dir, resume=...)`` then ``run()`` (returns 0, or 143 after a SIGTERM-triggered save).
The step objective is defined in :mod:`moesaic.train.loss`. Resuming restores model, optimizer, step
(the schedule is a function of it), data position and RNG, so the continued run is bitwise identical to
an uninterrupted one (fp32/fp64, CPU, same thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

import moesaic
from moesaic.core.config import dump_yaml, loads_yaml, parse, to_dict
from moesaic.core.errors import CheckpointMismatchError, ConfigError
from moesaic.train import checkpoint as ckpt
from moesaic.train.aux_accumulation import AuxAccumulation
from moesaic.train.loss import count_tokens, count_valid
from moesaic.train.lr_schedule import lr_factor
from moesaic.train.metrics import MetricsWriter, RoutingStats
from moesaic.train.optim import build_adamw
from moesaic.train.task import eval_batch_size, evaluate, select_task
from moesaic.train.thor import thor_lm_step

EXIT_PREEMPTED = 143
#: Config fields that may change on resume (logging, cadence, length); anything else is a mismatch.
RESUME_ALLOWED = {f"train.{k}" for k in ("max_steps", "log_every", "eval_every", "save_every", "keep_last",
                                          "progress", "tensorboard", "threads", "eval_at_end", "save_at_end",
                                          "handle_sigterm", "eval_batch_size")}
RESUME_ALLOWED |= {"parallel.ep_size"}  # checkpoints hold global expert keys (parallel/expert_state.py)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"  # per process: ranks of one run share the folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError("--out", str(out), f"output folder is not writable ({e.strerror or e})") from None


class Trainer:
    def __init__(self, cfg: Any, out_dir: str | Path, resume: bool = False, log: Any = None):
        from moesaic.train.run_config import RunConfig

        self.out = Path(out_dir)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        check_writable(self.out)
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.data = cfg.data.build()
        self.task = select_task(cfg, self.data)  # LM or classification (train/task.py); mismatches raise
        vocab = self.data.vocab_size
        if getattr(cfg.model, "vocab_size", 0) is None:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
        elif getattr(cfg.model, "vocab_size", vocab) < vocab:
            raise ConfigError("model.vocab_size", cfg.model.vocab_size, f"must be >= the tokenizer's ({vocab})")
        self.cfg: RunConfig = cfg
        self.tc = tc
        self.dtype = torch.float64 if tc.dtype == "float64" else torch.float32
        torch.manual_seed(tc.seed)
        self.model = cfg.model.build().to(self.dtype)
        self.model = self.prepare_model(self.model)  # hook: expert parallelism shards the experts here
        self.aux_acc = AuxAccumulation(self.model, tc.aux_accumulation, tc.grad_accum)  # train/loss.py
        self.opt = build_adamw(self.model, tc.lr, (tc.beta1, tc.beta2), tc.eps, tc.weight_decay)
        self.loader = self.data.loader(tc.seed)
        self.eval_data = self.data.eval_batches(eval_batch_size(tc))
        self.step = 0
        self.stats = RoutingStats(self.model)
        self.gather_model_state = ckpt.gather_model_state  # hook: expert parallelism gathers global experts
        self.scatter_model_state = None
        self._stop = False
        self.metrics = MetricsWriter(self.out, tc.tensorboard) if self.is_writer else _NoMetrics()
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

    # ------------------------------------------------------------- hooks (parallel/trainer.py overrides)
    #: Whether this process writes checkpoints, metrics and config (rank 0 of a distributed run).
    is_writer = True

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def gather_optimizer_state(self, state: dict) -> dict:
        return state

    def scatter_optimizer_state(self, state: dict) -> dict:
        return state

    def checkpoint_extra_files(self, model_state: dict[str, torch.Tensor]) -> dict[str, bytes]:
        return {}

    def clip_grad_norm(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    # ------------------------------------------------------------------------------ checkpointing
    def save(self) -> Path:
        t0 = time.perf_counter()
        tok = getattr(self.data, "tokenizer", None)
        model_state = self.gather_model_state(self.model)  # collective under expert parallelism
        optimizer_state = self.gather_optimizer_state(self.opt.state_dict())
        if not self.is_writer:
            return self.out
        path = ckpt.save_checkpoint(
            self.out, self.step, config_yaml=dump_yaml(self.cfg), extra_files=self.checkpoint_extra_files(model_state),
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
        saved = parse(RunConfig, loads_yaml(files["config_yaml"], "config.yaml"), "")
        a, b = _flatten(to_dict(saved)), _flatten(to_dict(self.cfg))
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUME_ALLOWED)
        if diff:
            raise CheckpointMismatchError(f"{path}: the config differs from the checkpoint's in {', '.join(diff)}")
        ckpt.load_model_state(self.model, files["model_state"], str(path), self.scatter_model_state)
        try:
            self.opt.load_state_dict(self.scatter_optimizer_state(files["optimizer_state"]))
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
    def _autocast(self):
        if self.tc.autocast == "bf16":
            dev = next(self.model.parameters()).device.type
            return torch.autocast(device_type=dev, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def accumulate(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Forward and backward of ``batch`` split into ``grad_accum`` micro-batches; gradients are those of
        the step objective of train/loss.py. Returns the step's LM loss, aux loss and valid tokens."""
        ga = self.tc.grad_accum
        keys = [k for k in ("input_ids", "labels", "attention_mask") if batch.get(k) is not None]
        micro = [{k: batch[k].chunk(ga)[i] for k in keys} for i in range(ga)]
        N = count_valid(batch["labels"])
        T = count_tokens(batch)
        ce_total, aux_total = 0.0, 0.0
        alpha = self.tc.consistency_alpha

        def forward(mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """The micro-batch's forward(s): objective sum, CE sum, aux (also the exact-aux pre-pass)."""
            if alpha is not None:  # THOR: two stochastic passes + consistency (moesaic.train.thor)
                th = thor_lm_step(self.model, mb, alpha, self._autocast)
                return th.ce1 + th.ce2 + alpha * th.cr, (th.ce1 + th.ce2) / 2, th.aux
            with self._autocast():
                out = self.model(mb["input_ids"], attention_mask=mb.get("attention_mask"))
            ce_sum, _ = self.task.loss_sum(out.logits, mb["labels"])
            return ce_sum, ce_sum, moesaic.collect_aux_losses(self.model)

        with self.aux_acc.step(micro, forward, enabled=N > 0) as aux_is_share:
            for mb in micro if N > 0 else []:
                self.aux_acc.next_micro()
                obj_sum, ce_sum, aux = forward(mb)
                w = 1.0 if aux_is_share else count_tokens(mb) / T  # exact shares need no weighting
                loss = obj_sum / N + w * aux
                loss.backward()
                ce_total += float(ce_sum.detach()) / N
                aux_total += float(aux.detach()) * w
                self.stats.update()
        return {"loss": ce_total, "aux_loss": aux_total, "tokens": N}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step: lr from the schedule, :meth:`accumulate`, clip, AdamW, step hooks. An
        all-padding batch gives loss 0 and no update (reliability spec §3.4)."""
        for g in self.opt.param_groups:
            g["lr"] = self.tc.lr * lr_factor(self.step, self.tc)
        out: dict[str, float] = self.accumulate(batch)
        if out["tokens"] > 0:
            if self.tc.grad_clip > 0:
                out["grad_norm"] = self.clip_grad_norm(self.tc.grad_clip)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        moesaic.on_optimizer_step(self.model, self.step)
        out["lr"] = self.opt.param_groups[0]["lr"]
        return out

    def evaluate(self) -> dict[str, float]:
        """The task's metrics on the eval batches: val_loss and val_ppl (LM) or val_accuracy (classifier)."""
        return evaluate(self.model, self.task, self.eval_data, self._autocast)

    # -------------------------------------------------------------------------------------- loop
    def _on_sigterm(self, signum, frame) -> None:  # noqa: ARG002
        self._stop = True

    def run(self) -> int:
        tc = self.tc
        old = signal.signal(signal.SIGTERM, self._on_sigterm) if tc.handle_sigterm else None
        self.model.train()
        self.summary: dict[str, Any] = {"start_step": self.step}
        win_tokens, win_time, all_tokens, all_time = 0, 0.0, 0, 0.0
        last: dict[str, Any] = {}
        progress = _Progress(tc.max_steps, self.step, enabled=tc.progress)
        code = 0
        try:
            while self.step < tc.max_steps:
                batch = self.loader.next_batch(tc.batch_size)
                t0 = time.perf_counter()
                r = self.train_step(batch)
                dt = time.perf_counter() - t0
                n_tok = self.task.throughput_tokens(batch, r["tokens"])
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
                        self.log(_log_line(rec, tc.max_steps))
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


class _NoMetrics:
    """Metrics sink of the non-writing ranks of a distributed run."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _log_line(rec: dict[str, Any], total: int) -> str:
    worst = max((v["max_over_mean"] for v in rec.get("routing", {}).values()), default=None)
    load = f"  max/mean load {worst:.2f}" if worst is not None else ""
    return (f"step {rec['step']}/{total}  loss {rec['loss']:.4f}  aux {rec['aux_loss']:.4f}  "
            f"lr {rec['lr']:.2e}  {rec['tokens_per_s']:.0f} tok/s{load}")


class _Progress:
    """A rich progress bar (step, loss, tokens/s, ETA) on a terminal; nothing otherwise."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:.0f} tok/s"),
                                TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)
            self.bar.start()

    def update(self, step: int, loss: float, tps: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, tps=tps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
