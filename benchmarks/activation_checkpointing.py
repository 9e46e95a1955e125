"""Activation checkpointing (``model.activation_checkpointing``) on a training config's model: bytes kept for
backward, training-step time and loss equality, with and without it, interleaved in one process.

    python benchmarks/activation_checkpointing.py configs/demo.yaml [--steps 10] [--threads N]

Bytes are the distinct storages saved for backward (saved-tensor hooks) plus the block inputs that
``torch.utils.checkpoint`` keeps itself; losses are compared bitwise over the same batches (docs/benchmarks.md,
"Activation checkpointing").
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
import torch.nn.functional as F

from moesaic.bench.measure import run_header, saved_bytes, time_interleaved
from moesaic.moe.recompute import recomputing
from moesaic.train.optim import build_adamw
from moesaic.train.run_config import load_run_config


def build(config: str, ckpt: bool, vocab: int) -> Any:
    cfg = load_run_config(config, [f"model.vocab_size={vocab}", f"model.activation_checkpointing={str(ckpt).lower()}"])
    torch.manual_seed(0)
    model = cfg.model.build()
    model.train()
    return model, cfg


def step_fn(model: Any, ids: torch.Tensor) -> Any:
    opt = build_adamw(model, lr=1e-3)

    def step() -> torch.Tensor:
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def kept_bytes(model: Any, ids: torch.Tensor, ckpt: bool) -> int:
    kept: dict[int, int] = {}

    def count_inputs(_m: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if not recomputing():
            for a in args:
                if isinstance(a, torch.Tensor):
                    kept.setdefault(a.untyped_storage().data_ptr(), a.untyped_storage().nbytes())

    handles = [layer.register_forward_pre_hook(count_inputs) for layer in model.model.layers] if ckpt else []
    n, out = saved_bytes(lambda: model(ids[:, :-1]).logits.sum())
    out.backward()
    model.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    return n + sum(kept.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config", nargs="?", default="configs/demo.yaml")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="default: every core")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size (the demo's BPE: 1024)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    plain, cfg = build(a.config, False, a.vocab)
    ckpt, _ = build(a.config, True, a.vocab)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(a.vocab, (cfg.train.batch_size, cfg.data.seq_len + 1), generator=g)
    b_plain, b_ckpt = kept_bytes(plain, ids, False), kept_bytes(ckpt, ids, True)
    f_plain, f_ckpt = step_fn(plain, ids), step_fn(ckpt, ids)
    losses = [(f_plain(), f_ckpt()) for _ in range(3)]
    equal = all(torch.equal(x, y) for x, y in losses)
    secs = time_interleaved({"plain": f_plain, "checkpointed": f_ckpt}, repeats=a.steps, warmup=1)
    print(run_header())
    print("| variant | bytes saved for backward | step time (median) |")
    print("|---|---:|---:|")
    print(f"| no checkpointing | {b_plain / 2**20:.1f} MiB | {secs['plain'] * 1e3:.0f} ms |")
    print(f"| every block checkpointed | {b_ckpt / 2**20:.1f} MiB ({b_ckpt / b_plain:.1%}) | "
          f"{secs['checkpointed'] * 1e3:.0f} ms ({secs['checkpointed'] / secs['plain']:.2f}x) |")
    print(f"losses over 3 steps bitwise equal: {equal}")
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
