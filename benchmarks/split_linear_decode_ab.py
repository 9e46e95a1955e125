"""A/B of moesaic.core.split_linear on the protocol of the shared reference decode_vs_transformers.py: transformers
`generate`, `moesaic.generate` with the split and without it (``MAX_ROWS = 0``), interleaved in one process,
rounds shuffled, medians; checks that all three give the same tokens. NT threads (default all cores), ROUNDS rounds.

    NT=2 ROUNDS=7 python benchmarks/split_linear_decode_ab.py [out.json]
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moesaic import generate
from moesaic.bench.measure import cpu_model
from moesaic.core import split_linear as sl
from moesaic.interop.hf import from_hf

V, P, N = 4096, 32, 64
COMMON = dict(vocab_size=V, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
              max_position_embeddings=256, tie_word_embeddings=False, router_jitter_noise=0.0)
SHAPES = {"E8 k2 F1024": dict(intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2),
          "E64 k8 F256": dict(intermediate_size=256, num_local_experts=64, num_experts_per_tok=8)}


def contenders(hf: MixtralForCausalLM, ms: torch.nn.Module, ids: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    def with_rows(rows: int) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            sl.MAX_ROWS = rows
            return generate(ms, ids, N)[0, -N:]
        return run
    return {"transformers": lambda: hf.generate(ids, max_new_tokens=N, do_sample=False, min_new_tokens=N)[0, P:],
            "moesaic split": with_rows(32), "moesaic no split": with_rows(0)}


def main() -> None:
    torch.set_num_threads(int(os.environ.get("NT", os.cpu_count() or 1)))
    rounds = int(os.environ.get("ROUNDS", 7))
    print(f"threads {torch.get_num_threads()}, CPU {cpu_model()}, load average {os.getloadavg()[0]:.2f}")
    torch.manual_seed(0)
    ids = torch.randint(0, V, (1, P))
    out = {}
    for name, sh in SHAPES.items():
        cfg = MixtralConfig(**COMMON, **sh)
        cfg._experts_implementation = "grouped_mm"
        hf = MixtralForCausalLM(cfg).eval()
        fs = contenders(hf, from_hf(hf).eval(), ids)
        with torch.inference_mode():
            toks = {k: f() for k, f in fs.items()}
            same = all(torch.equal(toks["transformers"], v) for v in toks.values())
            t: dict[str, list[float]] = {k: [] for k in fs}
            for _ in range(rounds):
                order = list(fs)
                random.shuffle(order)
                for k in order:
                    s = time.perf_counter()
                    fs[k]()
                    t[k].append(time.perf_counter() - s)
        sl.MAX_ROWS = 32
        tps = {k: N / statistics.median(v) for k, v in t.items()}
        out[name] = {"tok_s": tps, "same_tokens": same, "times": t}
        on, off, hf_tps = tps["moesaic split"], tps["moesaic no split"], tps["transformers"]
        print(f"{name}: transformers {hf_tps:.1f}, moesaic split {on:.1f}, no split {off:.1f} tok/s; "
              f"split/transformers {on / hf_tps:.2f}, no split/transformers {off / hf_tps:.2f}, "
              f"split gain {on / off:.2f}x, same tokens {same}", flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"threads": torch.get_num_threads(), "cpu": cpu_model(), "shapes": out}, f, indent=1)


if __name__ == "__main__":
    main()
