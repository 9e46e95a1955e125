"""The weight-reading floor of a batch-1 decode step, beside transformers' and moesaic's greedy decode.

At batch 1 a decode step multiplies one activation row by every weight matrix the token touches: the
attention projections, the router, the k selected experts of each layer, and the LM head. Those matrix-vector
products read every byte of those weights once and are bound by memory bandwidth, so no implementation of the
same fp32 model can decode faster than they run. This script times, interleaved in one process (medians):

* ``transformers``: ``MixtralForCausalLM.generate`` (greedy, ``min_new_tokens``), the shared reference
  protocol (4 layers, d=512, prompt 32, 64 new tokens);
* ``moesaic``: ``moesaic.generate`` on the same weights (``from_hf``), checked to give the same tokens;
* ``floor``: only the matrix-vector products of 64 decode steps on the same weights, as ``F.linear`` calls
  on one row (the k experts of each layer taken as the first k experts: same bytes as any k), nothing else:
  no norms, RoPE, attention scores, routing or sampling.

``floor / transformers`` tokens/s is the largest speed-up over transformers that any implementation
without fewer weight bytes could reach on this machine. Run: ``python benchmarks/decode_floor.py
--threads 2`` (docs/benchmarks.md, "Decode: the weight-reading floor").
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = {"E8 k2 F1024": dict(intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2),
          "E64 k8 F256": dict(intermediate_size=256, num_local_experts=64, num_experts_per_tok=8)}


def floor_step(hf: torch.nn.Module, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """One decode step's weight products on a ``[1, D]`` row (the weights of ``hf``, k experts per layer)."""
    mats: list[torch.Tensor] = []
    for layer in hf.model.layers:  # type: ignore[union-attr]
        a = layer.self_attn
        mats += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight, layer.mlp.gate.weight]
        ex = layer.mlp.experts
        for e in range(k):
            mats += [ex.gate_up_proj[e], ex.down_proj[e]]
    head = hf.lm_head.weight  # type: ignore[union-attr]

    rows = {w.shape[1]: torch.ones(1, w.shape[1]) for w in mats}

    def step(x_1D: torch.Tensor) -> torch.Tensor:
        acc = x_1D
        for w in mats:
            y = F.linear(x_1D if w.shape[1] == x_1D.shape[1] else rows[w.shape[1]], w)
            acc = acc + y[:, :1]
        return F.linear(x_1D, head)[:, :1] + acc

    return step


def run_shape(name: str, sh: dict[str, int], ids: torch.Tensor, args: argparse.Namespace) -> dict[str, object]:
    """One shape: the three implementations interleaved (shuffled per round), medians, tokens/s."""
    from transformers import MixtralConfig, MixtralForCausalLM

    import moesaic
    from moesaic.interop.hf import from_hf

    P, N = ids.shape[1], args.new_tokens
    cfg = MixtralConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False,
                        router_jitter_noise=0.0, **sh)
    cfg._experts_implementation = "grouped_mm"
    hf = MixtralForCausalLM(cfg).eval()
    ms = from_hf(hf).eval()
    step = floor_step(hf, sh["num_experts_per_tok"])
    x = torch.randn(1, 512)

    def floor() -> None:
        for _ in range(N):
            step(x)

    fns = {"transformers": lambda: hf.generate(ids, max_new_tokens=N, do_sample=False, min_new_tokens=N),
           "moesaic": lambda: moesaic.generate(ms, ids, N), "floor": floor}
    with torch.inference_mode():
        same = bool((fns["transformers"]()[0, P:] == fns["moesaic"]()[0, -N:]).all())
        floor()
        times: dict[str, list[float]] = {n: [] for n in fns}
        order = list(fns)
        for r in range(args.repeats):
            random.Random(r).shuffle(order)
            for n in order:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
    tps = {n: N / statistics.median(v) for n, v in times.items()}
    row = {"shape": name, "threads": torch.get_num_threads(), "same_tokens": same,
           **{f"{n}_tok_s": round(v, 1) for n, v in tps.items()},
           "moesaic_vs_transformers": round(tps["moesaic"] / tps["transformers"], 3),
           "floor_vs_transformers": round(tps["floor"] / tps["transformers"], 3)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(0, 4096, (1, 32))
    rows = [run_shape(name, sh, ids, args) for name, sh in SHAPES.items()]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
