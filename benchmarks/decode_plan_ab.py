"""The decode plan on and off, interleaved in one process (medians), on the reference protocol's model.

``python benchmarks/decode_plan_ab.py --shape E8|E64 --threads 2 --repeats 9``: ``moesaic.generate`` with the
session's :class:`~moesaic.inference.decode_plan.DecodePlan` (the default) and without it (``DecodePlan.build``
answering None: every step runs the module path), beside transformers' ``generate``, on the 4-layer d=512
Mixtral-style model of ``../shared/bench/decode_vs_transformers.py`` (fp32, prompt 32, 64 new tokens). Checks that
both give the same tokens. docs/benchmarks.md, "Decode".
"""

from __future__ import annotations

import argparse
import json

import torch

SHAPES = {"E8": dict(intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2),
          "E64": dict(intermediate_size=256, num_local_experts=64, num_experts_per_tok=8)}


def main() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    import moesaic
    from moesaic.bench.measure import time_interleaved
    from moesaic.inference import decode_plan
    from moesaic.interop.hf import from_hf

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="E8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    V, P, N = 4096, 32, 64
    cfg = MixtralConfig(vocab_size=V, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False,
                        router_jitter_noise=0.0, **SHAPES[args.shape])
    cfg._experts_implementation = "grouped_mm"
    hf = MixtralForCausalLM(cfg).eval()
    ms = from_hf(hf).eval()
    ids = torch.randint(0, V, (1, P))
    build = decode_plan.DecodePlan.build

    def plan_off() -> torch.Tensor:
        decode_plan.DecodePlan.build = staticmethod(lambda model: None)  # type: ignore[method-assign]
        try:
            return moesaic.generate(ms, ids, N)
        finally:
            decode_plan.DecodePlan.build = build  # type: ignore[method-assign]

    fns = {"plan_off": plan_off, "plan_on": lambda: moesaic.generate(ms, ids, N),
           "transformers": lambda: hf.generate(ids, max_new_tokens=N, do_sample=False, min_new_tokens=N)}
    with torch.inference_mode():
        same = torch.equal(plan_off(), moesaic.generate(ms, ids, N))
        med = time_interleaved(fns, args.repeats)  # wall clock, shuffled per round, medians
    tps = {k: round(N / v, 1) for k, v in med.items()}
    print(json.dumps({"shape": args.shape, "threads": args.threads, "same_tokens": same, "tok_s": tps,
                      "plan_on_over_off": round(tps["plan_on"] / tps["plan_off"], 3),
                      "plan_on_over_transformers": round(tps["plan_on"] / tps["transformers"], 3)}))


if __name__ == "__main__":
    main()
