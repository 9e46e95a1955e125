"""decode: greedy decode tokens/s of moesaic.generate against transformers' generate on the same weights.

The protocol of the shared reference (``decode_vs_transformers.py``): a 4-layer d=512 Mixtral-style model
built in transformers (``grouped_mm`` experts) and imported with ``from_hf``; fp32; prompt 32, 64 new
tokens (``min_new_tokens`` so both generate exactly N); shapes E8 k2 F1024 and E64 k8 F256; the two
implementations interleaved in one process (shuffled each round), medians; the token ids are compared.
Also: ``moesaic.generate(..., compile=True)`` (torch.compile of the decode step, timed after one warm-up
call that compiles), and batch-8 throughput (8 prompts of different lengths, left-padded, both sides).
Prints the thread count and the allocator (``LD_PRELOAD`` or glibc malloc) first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Any

import torch

TARGET = "decode"
SHAPES: dict[str, dict[str, Any]] = {"E8k2": dict(intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2),
          "E64k8": dict(intermediate_size=256, num_local_experts=64, num_experts_per_tok=8)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (default all)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="batch of the throughput run (0: skip it)")
    p.add_argument("--compile", action="store_true", help="also time moesaic with compile=True")
    p.add_argument("--json", default=None, help="write the results to this file")


def _model(shape: str, vocab: int) -> tuple[Any, torch.nn.Module]:
    from transformers import MixtralConfig, MixtralForCausalLM

    from moesaic.interop.hf import from_hf

    cfg = MixtralConfig(vocab_size=vocab, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False,
                        router_jitter_noise=0.0, **SHAPES[shape])
    cfg._experts_implementation = "grouped_mm"
    hf = MixtralForCausalLM(cfg).eval()
    return hf, from_hf(hf).eval()


def run(args: argparse.Namespace) -> int:
    import moesaic
    from moesaic.bench.measure import cpu_model, time_interleaved

    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}  allocator {os.environ.get('LD_PRELOAD') or 'glibc malloc'}  "
          f"torch {torch.__version__}  load average {os.getloadavg()[0]:.2f}  CPU {cpu_model()}")
    torch.manual_seed(0)
    V, P, N = 4096, args.prompt_len, args.new_tokens
    ids = torch.randint(0, V, (1, P))
    lens = [P - 3 * i for i in range(args.batch)] if args.batch else []
    ids_B = torch.zeros(len(lens), P, dtype=torch.long)
    mask_B = torch.zeros(len(lens), P, dtype=torch.long)
    for b, n in enumerate(lens):
        ids_B[b, P - n:], mask_B[b, P - n:] = torch.randint(0, V, (n,)), 1
    hf_kw: dict[str, Any] = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False)
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "prompt": P, "new_tokens": N}
    for shape in args.shapes:
        hf, ms = _model(shape, V)
        fns: dict[str, Any] = {
            "transformers": lambda hf=hf: hf.generate(ids, **hf_kw),
            "moesaic": lambda ms=ms: moesaic.generate(ms, ids, N),
        }
        with torch.inference_mode():
            same = bool((hf.generate(ids, **hf_kw)[0, P:] == moesaic.generate(ms, ids, N)[0, P:]).all())
            if args.compile:
                moesaic.generate(ms, ids, N, compile=True)  # compiles
                fns["moesaic compiled"] = lambda ms=ms: moesaic.generate(ms, ids, N, compile=True)
            if lens:
                fns[f"transformers b{len(lens)}"] = lambda hf=hf: hf.generate(ids_B, attention_mask=mask_B, **hf_kw)
                fns[f"moesaic b{len(lens)}"] = lambda ms=ms: moesaic.generate(ms, ids_B, N, attention_mask=mask_B)
            t = time_interleaved(fns, args.repeats, warmup=1)
        tps = {k: N * (len(lens) if " b" in k else 1) / v for k, v in t.items()}
        base = tps["transformers"]
        line = "  ".join(f"{k} {v:.1f} tok/s" for k, v in tps.items())
        print(f"{shape}: {line}  ratio {tps['moesaic'] / base:.2f}"
              + (f"  compiled ratio {tps['moesaic compiled'] / base:.2f}" if args.compile else "")
              + f"  same tokens: {same}")
        results[shape] = {"tokens_per_s": tps, "ratio": tps["moesaic"] / base, "same_tokens": same}
    results["load_average_after"] = os.getloadavg()[0]
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.json)
    return 0 if all(results[s]["same_tokens"] for s in args.shapes) else 1


__all__ = ["TARGET", "add_arguments", "run", "statistics"]
