"""``moesaic train CONFIG [--set k=v ...] [--out DIR] [--resume] [--init-from CKPT_OR_HF]``: train a model from a
YAML config, optionally starting from the weights of a moesaic checkpoint (e.g. a ``moesaic convert`` output)
or a Hugging Face folder (docs/convert.md). A model config with ``pretrained`` (``sentence_encoder``) starts from
that dense checkpoint, its FFNs copied into every expert (docs/zoo.md, "Embeddings")."""

from __future__ import annotations

import argparse
from typing import Any

from moesaic.cli import SubParsers


def add_parser(sub: SubParsers) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model from a YAML config (checkpoints and metrics in --out)")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=50 (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest valid checkpoint in --out (invalid ones are skipped)")
    p.add_argument("--init-from", default=None, metavar="CKPT_OR_HF",
                   help="start from these weights (a moesaic checkpoint, e.g. a `moesaic convert` output, or a Hugging "
                        "Face folder); they must fit the config's model (names and shapes)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="launch N processes on this machine with torchrun (same as `torchrun --nproc-per-node N "
                        "-m moesaic train ...`); experts are sharded over parallel.ep_size of them")
    return p


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from moesaic.cli._config_file import load_run_config_file
    from moesaic.core.errors import ConfigError
    from moesaic.train.trainer import Trainer

    cfg = load_run_config_file(args.config, args.overrides)
    out = args.out or str(Path("runs") / Path(args.config).stem)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.nproc is not None and "LOCAL_RANK" not in os.environ:
        from moesaic.distributed.launch import torchrun

        if args.nproc < 1 or args.nproc % cfg.parallel.ep_size:
            raise ConfigError("--nproc", args.nproc, f"must be a positive multiple of parallel.ep_size "
                                                     f"({cfg.parallel.ep_size})")
        argv = [args.config, "--out", out, *(x for o in args.overrides for x in ("--set", o)),
                *(["--init-from", args.init_from] if args.init_from else [])]
        return torchrun(args.nproc, ["train", *argv, *(["--resume"] if args.resume else [])])
    if cfg.parallel.ep_size > world:
        raise ConfigError("parallel.ep_size", cfg.parallel.ep_size, f"needs at least that many processes (got "
                                                                     f"{world}); use --nproc N or torchrun")
    if world > 1:
        from moesaic.distributed.groups import init_process_group

        init_process_group()  # the trainer then picks expert + data parallelism (distributed/strategy.py)
    init_kw: dict[str, Any] = {}
    pretrained = str(getattr(cfg.model, "pretrained", None) or "")
    if not args.init_from and pretrained:
        from moesaic.transforms.upcycle import pretrained_init_state

        init_kw = {"init_state": pretrained_init_state(cfg.model, cfg.train.seed),
                   "init_from": f"model.pretrained {pretrained}"}
    if args.init_from:
        import moesaic
        from moesaic.distributed.expert_state import local_model_state

        init_kw = {"init_state": local_model_state(moesaic.load(args.init_from)), "init_from": str(args.init_from)}
    if world > 1:
        trainer, code = _run_rank(cfg, out, args.resume, world, init_kw)
    else:
        trainer = Trainer(cfg, out, resume=args.resume, **init_kw)
        code = trainer.run()
    s, writer = trainer.summary, trainer.is_writer
    if world > 1:  # release DDP's reducer before its process groups, then leave together (no abort at exit)
        import gc

        import torch.distributed as dist

        del trainer
        gc.collect()
        try:
            dist.barrier()
        except RuntimeError as e:  # a peer is gone (killed; the launcher stopped this rank): leave without it
            if not any(w in str(e).lower() for w in _COMM_ERRORS):
                raise
        dist.destroy_process_group()
    if not writer:
        return code
    val = f"  val_loss {s['val_loss']:.4f}" if "val_loss" in s else ""
    val += f"  val_accuracy {s['val_accuracy']:.4f}" if "val_accuracy" in s else ""
    print(f"step {s['steps']}  loss {s.get('loss', float('nan')):.4f}{val}  {s['tokens_per_s']:.0f} tokens/s  "
          f"-> {out}")
    return code


#: Words in the RuntimeError of a broken or timed-out collective (gloo's transport, NCCL, the c10d store).
_COMM_ERRORS = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout", "broken pipe",
                "socket")


def _run_rank(cfg: Any, out: str, resume: bool, world: int, init_kw: dict[str, Any]) -> tuple[Any, int]:
    """One rank of a distributed run: a collective that breaks because another rank died or hung (a
    RuntimeError from the backend) becomes a one-line RankFailedError naming this rank and the step."""
    import torch.distributed as dist

    from moesaic.core.errors import RankFailedError
    from moesaic.train.trainer import Trainer

    rank, trainer = dist.get_rank(), None
    try:
        trainer = Trainer(cfg, out, resume=resume, **init_kw)
        return trainer, trainer.run()
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        if not (isinstance(e, dist.DistError) or any(w in msg.lower() for w in _COMM_ERRORS)):
            raise
        at = f" at step {trainer.step + 1}" if trainer is not None else " while starting"
        raise RankFailedError(f"rank {rank} of {world}: a collective failed{at} ({msg[:160]}); another rank "
                              "died or hung, nothing was published from this step") from None
