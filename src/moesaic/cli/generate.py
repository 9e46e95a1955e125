"""``moesaic generate CKPT_OR_HF --prompt TEXT [--prompt TEXT ...] [--prompts-file FILE]``: complete prompts
with a static KV cache, batched (left-padded), greedy when ``--temperature 0``; ``--stop``, ``--seed``,
``--sample-top-k``, ``--compile``, ``--stream``, ``--json``, and the MoE decoding strategies (``--top-k``,
``--scmoe``, ``--drop``, ``--early-exit``: docs/inference.md)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from moesaic.cli import SubParsers, _decode_flags, _offload_flags


def add_parser(sub: SubParsers) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="complete prompts with a checkpoint (static KV cache; greedy when "
                                        "--temperature 0)")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line (added after the --prompt ones)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--sample-top-k", type=int, default=0, help="sample among the K most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable; not printed)")
    p.add_argument("--max-batch", type=int, default=None, help="rows decoded at once (default: all prompts)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (eager by default)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt)")
    p.add_argument("--json", action="store_true", help="one JSON line per prompt (text, finish reason, counts)")
    _decode_flags.add_arguments(p)
    _offload_flags.add_arguments(p)
    return p


def _prompts(args: argparse.Namespace) -> list[str]:
    from moesaic.core.errors import ConfigError

    prompts = list(args.prompt)
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ConfigError("--prompts-file", args.prompts_file, "is not a readable file")
        prompts += [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not prompts:
        raise ConfigError("--prompt", None, "give at least one --prompt or a --prompts-file")
    if args.stream and len(prompts) > 1:
        raise ConfigError("--stream", True, "streams one prompt; got " + str(len(prompts)))
    return prompts


def run(args: argparse.Namespace) -> int:
    import moesaic
    from moesaic.core.errors import CheckpointMismatchError, ConfigError
    from moesaic.models.decoder import DecoderLM

    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", args.max_new_tokens, "must be >= 1")
    prompts = _prompts(args)
    _offload_flags.check(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError("--threads", args.threads, "must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    model = moesaic.load(args.checkpoint)
    tok = getattr(model, "tokenizer", None)
    cfg = getattr(model, "cfg", None)
    if hasattr(cfg, "num_labels"):
        raise CheckpointMismatchError(f"{args.checkpoint}: model.kind {getattr(cfg, 'kind', '?')} is a classifier, "
                                      "not a language model; use `moesaic eval` for its accuracy")
    if tok is None or not isinstance(model, DecoderLM):
        raise CheckpointMismatchError(f"{args.checkpoint}: not a language model with a tokenizer")
    ids = [tok.encode(p) for p in prompts]
    ctx = model.max_seq_len
    for i, t in enumerate(ids):
        if not t:
            raise ConfigError(f"--prompt.{i}", prompts[i], "must not be empty")
        if len(t) >= ctx:
            raise ConfigError(f"--prompt.{i}", f"<{len(t)} tokens>", f"longer than the model's context ({ctx} tokens)")
    new = min(args.max_new_tokens, ctx - max(len(t) for t in ids))
    lm, info = _decode_flags.apply(args, model)

    def stream(i: int, tok_id: int, delta: str | None) -> None:
        if delta:
            sys.stdout.write(delta)
            sys.stdout.flush()

    def go(on_token: Any = None) -> list[moesaic.Completion]:
        return moesaic.complete(lm, ids, tokenizer=tok, max_new_tokens=new, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.sample_top_k, seed=args.seed, stop=args.stop,
                                compile=args.compile, max_batch=args.max_batch, on_token=on_token)

    offload = _offload_flags.apply(args, model, go)
    if args.stream:
        sys.stdout.write(prompts[0])
    t0 = time.perf_counter()
    res = go(stream if args.stream else None)
    secs = time.perf_counter() - t0
    info.update(_offload_flags.report(args, offload))
    if args.stream:
        print()
    for p, c in zip(prompts, res, strict=True):
        if args.json:
            print(json.dumps({"prompt": p, "text": c.text, "finish_reason": c.finish_reason,
                              "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, **info}))
        elif not args.stream:
            print(p + (c.text or ""))
    n = sum(c.completion_tokens for c in res)
    print(f"[{n} tokens in {secs:.2f}s, {n / max(secs, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0
