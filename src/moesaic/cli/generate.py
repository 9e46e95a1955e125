"""``moesaic generate CKPT --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S]``."""

from __future__ import annotations

import argparse
from typing import Any

from moesaic.cli import SubParsers


def add_parser(sub: SubParsers) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="sample text from a checkpoint (KV cache; greedy when --temperature 0)")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    import moesaic
    from moesaic.core.errors import CheckpointMismatchError, ConfigError
    from moesaic.models.decoder import DecoderLM

    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", args.max_new_tokens, "must be >= 1")
    model = moesaic.load(args.checkpoint)
    tok = getattr(model, "tokenizer", None)
    cfg: Any = getattr(model, "cfg", None)  # any model config; a classifier's has num_labels
    if hasattr(cfg, "num_labels"):
        raise CheckpointMismatchError(f"{args.checkpoint}: model.kind {cfg.kind} is a classifier, not a "
                                      "language model; use `moesaic eval` for its accuracy")
    if tok is None or not isinstance(model, DecoderLM):  # the one model kind with `generate`
        raise CheckpointMismatchError(f"{args.checkpoint}: not a language model with a tokenizer")
    ids = tok.encode(args.prompt)
    if not ids:
        raise ConfigError("--prompt", args.prompt, "must not be empty")
    ctx = model.max_seq_len
    if len(ids) >= ctx:
        raise ConfigError("--prompt", f"<{len(ids)} tokens>", f"longer than the model's context ({ctx} tokens)")
    new = min(args.max_new_tokens, ctx - len(ids))
    out = model.generate(torch.tensor([ids]), max_new_tokens=new, temperature=args.temperature, top_p=args.top_p,
                         generator=torch.Generator().manual_seed(args.seed))
    print(tok.decode(out[0].tolist()))
    return 0
