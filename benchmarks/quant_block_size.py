"""Decode tokens/s of quantized experts against the block size of the blockwise dequantization
(:data:`moesaic.inference.quant_blockwise.BLOCK_BYTES`; docs/benchmarks.md, "Compressed experts on the 4 GB
benchmark model").

The offloading benchmark's model (:mod:`moesaic.bench.offload_worker`, 4.43 GB of fp32 experts) is quantized
once; then every block size decodes the same prompt in turn, ``--rounds`` times interleaved, and the median
tokens/s per size is printed.

Usage: ``python benchmarks/quant_block_size.py [--bits 8] [--sizes-mib 1 2 4 8] [--rounds 3] [--threads N]``
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from moesaic.bench import offload_worker as W
from moesaic.bench.measure import run_header
from moesaic.inference import quant_blockwise
from moesaic.inference.quant import QuantConfig, quantize_experts_


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=8, choices=[8, 4])
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=24)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(run_header("wall", f"int{a.bits} experts, block sizes interleaved, median decode tok/s"), flush=True)
    s = W.Spec(dir="", prompt_len=a.prompt_len, new_tokens=a.new_tokens, threads=a.threads)
    model = W.build(s)
    W.fill_experts(model)
    quantize_experts_(model, QuantConfig(bits=a.bits, group_size=64))
    res: dict[int, list[float]] = {m: [] for m in a.sizes_mib}
    default = quant_blockwise.BLOCK_BYTES
    try:
        for _ in range(a.rounds):
            for mib in a.sizes_mib:
                quant_blockwise.BLOCK_BYTES = mib << 20
                res[mib].append(W.decode(model, s)["tok_s"])
    finally:
        quant_blockwise.BLOCK_BYTES = default
    for mib, v in res.items():
        runs = ", ".join(f"{x:.1f}" for x in v)
        print(f"int{a.bits}, blocks of {mib} MiB: {statistics.median(v):.1f} tok/s ({runs})")


if __name__ == "__main__":
    main()
