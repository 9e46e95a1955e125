"""Chaos launcher: run the real ``moesaic`` CLI in this process with one fault armed, and record the type of the
exception that ended the command (the CLI still prints its own one line; a traceback would show on stderr).

    python benchmarks/chaos/launch.py --result R [FAULT] -- train CONFIG --out DIR [...]

FAULT (``--step S`` is the 0-based training step, as passed to moesaic.train.faults' ``step.begin``):
  --kill forward|backward|optimizer|eval --nth K   SIGKILL inside the K-th module forward of step S (training),
                                                   inside the backward through that output, at the optimizer step,
                                                   or inside the K-th module forward of the evaluation after S
  --kill point:NAME                                SIGKILL at fault point NAME (checkpoint.after_files, ...) of step S
  --kill gather --step S                           SIGKILL inside the save after step S, between the model's and the
                                                   optimizer's gather (a non-writer rank mid-save)
  --rank R                                         under --nproc: arm the fault on rank R only
  --inject nan-act|inf-grad|nan-weight --nth K     NaN into the K-th module output / inf into the gradient through it /
                                                   NaN into the K-th Linear weight at the start of step S (in place
                                                   during a forward, autograd would see its saved tensor changed)
  --fill PATH                                      at step S fill the file system of PATH (a tmpfs) to the last byte
  --readonly DIR                                   at step S bind-mount DIR read-only over itself
  --vanish FILE | --rewrite FILE                   delete FILE / rewrite it shorter after the loader read its first
                                                   chunk (fault point data.read)
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import subprocess
import sys
from pathlib import Path


def main() -> int:
    sep = sys.argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--result", required=True)
    p.add_argument("--kill")
    p.add_argument("--inject")
    p.add_argument("--fill")
    p.add_argument("--readonly")
    p.add_argument("--vanish")
    p.add_argument("--rewrite")
    p.add_argument("--step", type=int, default=-1)
    p.add_argument("--nth", type=int, default=1)
    p.add_argument("--rank", type=int, default=None, help="only this rank of a --nproc run (default: every rank)")
    a = p.parse_args(sys.argv[1:sep])
    rank = os.environ.get("RANK")
    if rank is not None:  # a worker of `moesaic train --nproc N`: its own result file, faults on --rank only
        a.result = f"{a.result}.rank{rank}"
        if a.rank is not None and int(rank) != a.rank:
            a.kill = a.inject = a.fill = a.readonly = a.vanish = a.rewrite = None
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the harness asks for the stacks of a hang

    import torch

    import moesaic.cli as cli
    from moesaic.train import faults

    state = {"step": -1, "count": 0, "done": False}

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    from moesaic.train.trainer import Trainer

    if "--nproc" in sys.argv[sep + 1:] and rank is None:  # the parent: its workers run this launcher too
        import moesaic.distributed.launch as dl

        dl.WORKER = [str(Path(__file__).resolve()), *sys.argv[1:sep], "--"]

    trainer_step, trainer_save = Trainer.train_step, Trainer.save
    model: dict[str, torch.nn.Module] = {}

    def recording_step(self: Trainer, batch: dict) -> dict:
        model["m"] = self.model
        return trainer_step(self, batch)

    def killing_save(self: Trainer) -> Path:  # --kill gather: inside the save, between the two collectives
        if a.kill == "gather" and self.step == a.step:
            self.strategy.gather_optimizer_state = lambda *_: kill()  # type: ignore[method-assign]
        return trainer_save(self)

    Trainer.train_step = recording_step  # type: ignore[method-assign]
    Trainer.save = killing_save  # type: ignore[method-assign]

    def on_step(step: int, rank: int = 0) -> None:
        state["step"], state["count"] = step, 0
        if step != a.step or state["done"]:
            return
        if a.inject == "nan-weight":  # at the step boundary: no graph holds the weight yet
            state["done"] = True
            linears = [m for m in model["m"].modules() if isinstance(m, torch.nn.Linear)]
            with torch.no_grad():
                linears[(a.nth - 1) % len(linears)].weight.view(-1)[0] = float("nan")
        if a.fill:
            state["done"] = True
            fd = os.open(Path(a.fill) / ".chaos-filler", os.O_WRONLY | os.O_CREAT, 0o644)
            try:  # unbuffered: a buffered file would raise ENOSPC again on close
                for size in (65536, 1):
                    while True:
                        try:
                            os.write(fd, b"\0" * size)
                        except OSError:
                            break
            finally:
                os.close(fd)
        if a.readonly:
            state["done"] = True
            subprocess.run(["mount", "--bind", a.readonly, a.readonly], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", a.readonly], check=True)

    faults.install("step.begin", on_step)

    def on_read(offset: int) -> None:
        if state["done"]:
            return
        state["done"] = True
        if a.vanish:
            os.unlink(a.vanish)
        if a.rewrite:
            Path(a.rewrite).write_text("a shorter text\n")

    if a.vanish or a.rewrite:
        faults.install("data.read", on_read)
    if a.kill and a.kill.startswith("point:"):
        faults.install(a.kill[6:], lambda step, rank=0: kill() if step == a.step else None)
    if a.kill == "optimizer":
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(lambda *_: kill() if state["step"] == a.step else None)

    def hook(module: torch.nn.Module, _inp: object, out: object) -> object:
        if state["step"] != a.step or state["done"] or not isinstance(out, torch.Tensor):
            return None
        training = module.training and torch.is_grad_enabled()
        want_eval = a.kill == "eval"
        if training == want_eval or not out.is_floating_point():
            return None
        state["count"] += 1
        if state["count"] != a.nth:
            return None
        state["done"] = True
        if a.kill in ("forward", "eval"):
            kill()
        if a.kill == "backward" and out.requires_grad:
            out.register_hook(lambda g: kill())
        if a.inject == "nan-act":
            return out * float("nan")
        if a.inject == "inf-grad" and out.requires_grad:
            out.register_hook(lambda g: g * float("inf"))
        return None

    if a.kill in ("forward", "backward", "eval") or a.inject in ("nan-act", "inf-grad"):
        torch.nn.modules.module.register_module_forward_hook(hook)

    build = cli.build_parser

    def recording_parser() -> argparse.ArgumentParser:
        parser = build()
        parse = parser.parse_args

        def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
            ns = parse(argv)
            run = ns._run

            def recorded(args: argparse.Namespace) -> int:
                try:
                    code = int(run(args) or 0)
                except BaseException as e:
                    Path(a.result).write_text(type(e).__name__)
                    raise
                Path(a.result).write_text("ok")
                return code
            ns._run = recorded
            return ns
        parser.parse_args = parse_args  # type: ignore[method-assign]
        return parser

    cli.build_parser = recording_parser
    return cli.main(sys.argv[sep + 1:])


if __name__ == "__main__":
    sys.exit(main())
