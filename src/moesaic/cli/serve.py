"""``moesaic serve CKPT_OR_HF_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]``: an OpenAI-compatible
HTTP server (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``, ``/metrics``).

``--port 0`` binds a free port; the server prints ``moesaic serve: listening on http://HOST:PORT`` on one
line of stdout once it accepts requests (scripts: :func:`moesaic.serve.launch`). SIGTERM shuts it down
gracefully. Batching, queue, limits and the MoE decoding-strategy flags: docs/serve.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moesaic.cli import SubParsers, _decode_flags


def add_parser(sub: SubParsers) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a checkpoint or Hugging Face folder")
    p.add_argument("checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 = a free port (printed on the ready line)")
    p.add_argument("--api-key", default=os.environ.get("MOESAIC_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $MOESAIC_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (1 = one at a time)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row; more get 429")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (0 = none); 408")
    p.add_argument("--body-limit", type=int, default=1 << 20, help="request body limit in bytes; 413 past it")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per sequence, prompt + completion (default: the model's context, at most 4096); "
                        "the KV cache holds max-batch rows of twice this")
    p.add_argument("--max-tokens", type=int, default=None, help="default max_tokens (default: up to the context)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds running requests may finish after SIGTERM before they are cancelled")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    _decode_flags.add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    import moesaic
    from moesaic.core.errors import CheckpointMismatchError, ConfigError
    from moesaic.serve.app import ServeConfig
    from moesaic.serve.chat import load_chat_template
    from moesaic.serve.server import build_app, run_server

    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--body-limit", args.body_limit, 1)):
        if value < low:
            raise ConfigError(flag, value, f"must be >= {low}")
    if args.request_timeout < 0 or args.shutdown_grace < 0:
        raise ConfigError("--request-timeout", args.request_timeout, "timeouts must be >= 0")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ConfigError("--max-tokens", args.max_tokens, "must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError("--threads", args.threads, "must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    model = moesaic.load(args.checkpoint)
    tok = getattr(model, "tokenizer", None)
    if hasattr(getattr(model, "cfg", None), "num_labels") or tok is None:
        raise CheckpointMismatchError(f"{args.checkpoint}: not a language model with a tokenizer")
    lm, _ = _decode_flags.apply(args, model)
    path = Path(args.checkpoint)
    cfg = ServeConfig(model_name=args.model_name or path.resolve().name, api_key=args.api_key or None,
                      body_limit=args.body_limit, request_timeout=args.request_timeout or None,
                      default_max_tokens=args.max_tokens)
    template = load_chat_template(path) if path.is_dir() else None
    run_server(lambda ready: build_app(lm, cfg, tokenizer=tok, chat_template=template, max_batch=args.max_batch,
                                       max_queue=args.max_queue, context=args.context, on_ready=ready),
               args.host, args.port, args.shutdown_grace)
    return 0
