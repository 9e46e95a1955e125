"""The offloaded-experts flags of ``moesaic generate`` (docs/inference.md, "Offloaded experts"):
``--offload-dir DIR`` (the disk tier: a store folder, written from the checkpoint on first use),
``--cache-experts N`` (slots per layer; alone it offloads to CPU RAM), ``--cache-policy``, ``--prefetch``,
``--offload-verify``, ``--offload-copy``, ``--offload-stats``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("offloaded experts")
    g.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="expert store folder (disk tier, mmap); written from the checkpoint if it does not exist")
    g.add_argument("--cache-experts", type=int, default=None, metavar="N",
                   help="experts cached per MoE layer (>= k); without --offload-dir the store is CPU RAM")
    g.add_argument("--cache-policy", default="lru", metavar="lru|lfu|lfru|oracle",
                   help="eviction policy (oracle: Belady on the trace of a first resident pass)")
    g.add_argument("--prefetch", default="none", metavar="none|pregate|prev",
                   help="background prefetch: next layer's router on this layer's input, or last token's experts")
    g.add_argument("--offload-verify", default="read", metavar="read|open|none",
                   help="sha256 check of the store: each expert on first read (default), all files at open, or none")
    g.add_argument("--offload-copy", action="store_true",
                   help="copy experts into RAM slots instead of mapping the store's file pages (zero copy)")
    g.add_argument("--offload-stats", action="store_true", help="print per-layer cache telemetry (stderr)")


def wanted(args: argparse.Namespace) -> bool:
    return args.offload_dir is not None or args.cache_experts is not None


def check(args: argparse.Namespace) -> None:
    """Flag rules that need no model (exit 2 before loading anything)."""
    from moesaic.core.errors import ConfigError
    from moesaic.inference.offload.disk import VERIFY
    from moesaic.inference.offload.policies import CACHE_POLICIES
    from moesaic.inference.offload.prefetch import PREFETCH_MODES

    if not wanted(args):
        return
    if args.cache_experts is None:
        raise ConfigError("--cache-experts", None, "give the experts cached per layer with --offload-dir")
    if args.cache_experts < 1:
        raise ConfigError("--cache-experts", args.cache_experts, "must be >= 1")
    if args.cache_policy not in CACHE_POLICIES:
        raise ConfigError("--cache-policy", args.cache_policy, f"must be one of {', '.join(CACHE_POLICIES.names())}")
    if args.prefetch not in PREFETCH_MODES:
        raise ConfigError("--prefetch", args.prefetch, f"must be one of {', '.join(PREFETCH_MODES)}")
    if args.offload_verify not in VERIFY:
        raise ConfigError("--offload-verify", args.offload_verify, f"must be one of {', '.join(VERIFY)}")
    d = args.offload_dir
    if d is not None and Path(d).exists() and not (Path(d) / "manifest.json").is_file():
        raise ConfigError("--offload-dir", d, "exists and is not an expert store (no manifest.json)")


def apply(args: argparse.Namespace, model: nn.Module, run: Callable[[], object]) -> Any:
    """Offload the model's experts as the flags say; ``run()`` replays the request for the oracle's trace.
    Returns the handle (``None`` when not offloading)."""
    from moesaic.inference.offload import (
        DiskStore,
        OffloadConfig,
        expert_modules,
        memory_store,
        offload_experts_,
        record_expert_trace,
        save_expert_store,
    )

    if not wanted(args):
        return None
    trace = record_expert_trace(model, run) if args.cache_policy == "oracle" else None
    if args.offload_dir is None:
        store: Any = memory_store(model, "cpu")
    else:
        d = Path(args.offload_dir)
        if not d.exists():
            save_expert_store(expert_modules(model), d)
        store = DiskStore(d, verify=args.offload_verify)
    cfg = OffloadConfig(cache_experts=args.cache_experts, policy=args.cache_policy, prefetch=args.prefetch,
                        zero_copy=not args.offload_copy)
    return offload_experts_(model, store, cfg, trace=trace)


def report(args: argparse.Namespace, handle: Any) -> dict[str, Any]:
    """Close the prefetcher; print the telemetry when asked; the summary for ``--json``."""
    if handle is None:
        return {}
    handle.close()
    s = handle.summary()
    if args.offload_stats:
        for name, t in s["layers"].items():
            print(f"[offload {name}: hits {t['hits']} misses {t['misses']} hit rate {t['hit_rate']:.3f} "
                  f"read {t['bytes_read'] / 2**20:.1f} MiB prefetch {t['prefetch_loads']} "
                  f"accuracy {t['prefetch_accuracy']:.3f}]", file=sys.stderr)
    return {"offload": s["total"]}
