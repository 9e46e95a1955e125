"""Padding-free vs padded batches on Shakespeare's real length distribution: the demo LM shape
(configs/demo.yaml, random weights) trained on speeches (one per example, up to 128 BPE tokens), forward +
backward, real tokens per second, both layouts interleaved in one process (median of the rounds).

Padded: batches of 16 speeches, right-padded to the longest. Packed: the same 16 speeches first-fit into
rows of 128 tokens (:func:`moesaic.train.packing.pack`).

Usage: ``python benchmarks/packing_throughput.py [--batches 12] [--rounds 5] [--threads 0]``
"""

from __future__ import annotations

import argparse
import os
import random
from functools import partial
from pathlib import Path

import torch

from moesaic.bench.measure import time_interleaved
from moesaic.train.datasets.shakespeare import ShakespeareData, play_files
from moesaic.train.datasets.speeches import speeches
from moesaic.train.packing import pack
from moesaic.train.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]


def step(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    for b in batches:
        out = model(b["input_ids"], attention_mask=b.get("attention_mask"), seq_ids=b.get("seq_ids")).logits
        out.float().square().mean().backward()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    cfg = load_run_config(ROOT / "configs" / "demo.yaml")
    data = ShakespeareData(cfg.data)  # type: ignore[arg-type]
    tok = data.tokenizer
    texts = [t for p in play_files().values() for _, t in speeches(p, 1)]
    random.Random(0).shuffle(texts)
    seqs = [ids[:128] for ids in (tok.encode(t) for t in texts[: 16 * args.batches]) if len(ids) >= 2]
    model = load_run_config(ROOT / "configs" / "demo.yaml", [f"model.vocab_size={tok.vocab_size}"]).model.build()
    padded, packed = [], []
    for i in range(0, len(seqs) - 15, 16):
        chunk = seqs[i:i + 16]
        M = max(map(len, chunk))
        ids = torch.zeros(len(chunk), M, dtype=torch.long)
        mask = torch.zeros(len(chunk), M, dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, :len(s)], mask[j, :len(s)] = torch.tensor(s), 1
        padded.append({"input_ids": ids, "attention_mask": mask})
        packed.append(pack(chunk, 128))
    real = sum(int(b["attention_mask"].sum()) for b in padded)
    slots_pad = sum(b["input_ids"].numel() for b in padded)
    slots_pack = sum(b["input_ids"].numel() for b in packed)
    s = time_interleaved({"padded": partial(step, model, padded), "packed": partial(step, model, packed)},
                         repeats=args.rounds, warmup=1)
    print(f"speeches {len(seqs)}, real tokens {real}, positions computed: padded {slots_pad} "
          f"({real / slots_pad:.0%} real), packed {slots_pack} ({real / slots_pack:.0%} real)")
    print(f"threads {torch.get_num_threads()}: padded {real / s['padded']:,.0f} tokens/s, packed "
          f"{real / s['packed']:,.0f} tokens/s, packed/padded {s['padded'] / s['packed']:.2f}x")


if __name__ == "__main__":
    main()
