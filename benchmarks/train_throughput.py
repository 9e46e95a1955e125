"""Training throughput (forward + backward + AdamW step) of an MoE LM against its dense twin with the same
active parameters, measured side by side in one process: steps alternate between the models (the order
flips every step) so that load from other processes hits all of them alike; the median step time of each
gives tokens/s, in wall-clock and in CPU time.

Two modes:

* default: ``configs/demo.yaml`` (or any config) and its dense twin (:func:`moesaic.examples.demo.dense_twin`),
  with the trainer's optimizer (:func:`moesaic.train.optim.build_adamw`);
* ``--reference``: the shapes the issue quotes for transformers (d_model 256, 4 layers, 4 heads, seq 256,
  batch 8, vocab 1024, fp32): Mixtral-style MoE (8 experts top-2 of width 512, and 64 experts top-8 of
  width 128; renormalised softmax top-k, balance loss 0.01) against the dense Llama-style twin of width
  1024, for moesaic *and* for transformers' ``MixtralForCausalLM`` / ``LlamaForCausalLM`` (grouped_mm and
  eager experts) in the same interleaved loop. Same AdamW settings for all (fused where supported).

``--repeats R`` measures R times in a row on the same models and reports the median of the R ratios with
all of them (the ratio of one 30-step measurement moves by about +-0.02 on a shared host).

Threads default to every core of the machine; the first output line names the thread count, the C allocator
(core/allocator.py) and the load average.

Usage: ``python benchmarks/train_throughput.py [configs/demo.yaml] [--steps 20] [--repeats 1] [--threads N]
[--set k=v ...] [--reference] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import moesaic
from moesaic.bench.measure import run_header
from moesaic.core.allocator import allocator_description
from moesaic.examples.demo import count_params, dense_twin
from moesaic.train.optim import build_adamw
from moesaic.train.run_config import load_run_config

Run = tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]  # model, ids -> loss


def moesaic_run(cfg) -> Run:
    torch.manual_seed(0)
    m = cfg.model.build()

    def loss(ids: torch.Tensor) -> torch.Tensor:
        out = m(ids[:, :-1])
        return F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss

    return m, loss


def hf_run(kind: str, D: int, L: int, H: int, V: int, S: int, E: int = 0, k: int = 0, Fd: int = 0,
           experts: str = "grouped_mm") -> Run:
    """transformers' Mixtral (``kind="moe"``) or Llama (``"dense"``) with the reference shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=H,
                  max_position_embeddings=S, tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    if kind == "moe":
        cfg = MixtralConfig(intermediate_size=Fd, num_local_experts=E, num_experts_per_tok=k, router_jitter_noise=0.0,
                            output_router_logits=True, router_aux_loss_coef=0.01, **common)
        cfg._experts_implementation = experts
        m = MixtralForCausalLM(cfg)
    else:
        m = LlamaForCausalLM(LlamaConfig(intermediate_size=Fd, **common))

    def loss(ids: torch.Tensor) -> torch.Tensor:  # transformers shifts the labels itself (+ router aux loss)
        return m(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss

    return m, loss


def measure(runs: dict[str, Run], batch: tuple[int, int], vocab: int, steps: int) -> dict[str, dict]:
    B, S = batch
    opts = {name: build_adamw(m, lr=1e-3) for name, (m, _) in runs.items()}  # the trainer's optimizer
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    g = torch.Generator().manual_seed(0)
    names = list(runs)
    for i in range(steps + 2):
        ids = torch.randint(vocab, (B, S + 1), generator=g)
        for name in (names if i % 2 == 0 else names[::-1]):
            m, loss_fn = runs[name]
            t0, c0 = time.perf_counter(), time.process_time()
            loss_fn(ids).backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            moesaic.on_optimizer_step(m, i + 1)
            if i >= 2:  # warm-up steps excluded
                times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    res = {}
    for name, (m, _) in runs.items():
        total, active = count_params(m)
        wall = statistics.median(t for t, _ in times[name])
        cpu = statistics.median(c for _, c in times[name])
        res[name] = {"tokens_per_s": B * S / wall, "median_step_s": wall, "median_step_cpu_s": cpu,
                     "tokens_per_cpu_s": B * S / cpu, "params": total, "active_params": active}
    return res


def ratios(res: dict[str, dict], moe: str, dense: str) -> dict[str, float]:
    return {"wall": res[moe]["tokens_per_s"] / res[dense]["tokens_per_s"],
            "cpu_time": res[moe]["tokens_per_cpu_s"] / res[dense]["tokens_per_cpu_s"]}


def reference(steps: int) -> dict:
    D, L, H, V, S, B, dense_ff = 256, 4, 4, 1024, 256, 8, 1024
    out: dict = {"shape": {"d_model": D, "layers": L, "heads": H, "vocab": V, "seq_len": S, "batch": B,
                           "dense_d_ff": dense_ff}}
    for E, k in ((8, 2), (64, 8)):
        Fd = dense_ff // k
        base = [f"model.vocab_size={V}", f"model.d_model={D}", f"model.num_layers={L}", f"model.d_ff={dense_ff}",
                f"model.max_seq_len={S}", "model.first_k_dense=0", "model.tie_word_embeddings=true",
                f"model.attention.num_heads={H}", f"model.moe.d_ff={Fd}", f"model.moe.num_experts={E}",
                f"model.moe.top_k={k}", "model.moe.granularity=1", "model.moe.shared_experts.num=0",
                "model.moe.router.normalization=renorm", "model.moe.router.aux_loss_coef=0.01",
                f"data.seq_len={S}", f"train.batch_size={B}"]
        cfg = load_run_config("configs/demo.yaml", base)
        runs = {"moesaic moe": moesaic_run(cfg), "moesaic dense": moesaic_run(dense_twin(cfg))}
        try:
            runs["transformers mixtral grouped_mm"] = hf_run("moe", D, L, H, V, S, E, k, Fd, "grouped_mm")
            runs["transformers mixtral eager"] = hf_run("moe", D, L, H, V, S, E, k, Fd, "eager")
            runs["transformers llama"] = hf_run("dense", D, L, H, V, S, Fd=dense_ff)
        except ImportError as e:
            out["transformers"] = f"skipped: {e}"
        res = measure(runs, (B, S), V, steps)
        row = {"experts": E, "top_k": k, "expert_d_ff": Fd, "results": res,
               "moesaic_moe_over_dense": ratios(res, "moesaic moe", "moesaic dense")}
        if "transformers llama" in res:
            for impl in ("grouped_mm", "eager"):
                row[f"transformers_{impl}_moe_over_dense"] = ratios(res, f"transformers mixtral {impl}",
                                                                    "transformers llama")
            row["moesaic_moe_over_transformers_grouped_mm"] = ratios(res, "moesaic moe",
                                                                     "transformers mixtral grouped_mm")
        out[f"E{E}_k{k}"] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1, help="measurements in a row; the median ratio is reported")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="default: every core")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--reference", action="store_true", help="the issue's Mixtral/Llama shapes, with transformers")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(run_header("wall", "median step time, wall clock (CPU-time ratios reported beside)"), flush=True)
    if args.reference:
        res = {"threads": args.threads, **reference(args.steps)}
    else:
        cfg = load_run_config(args.config, args.overrides)
        vocab = getattr(cfg.data, "vocab_size", 1024)
        if cfg.model.vocab_size is None:
            cfg = load_run_config(args.config, [*args.overrides, f"model.vocab_size={vocab}"])
        B, S = cfg.train.batch_size, cfg.data.seq_len
        runs = {"moe": moesaic_run(cfg), "dense": moesaic_run(dense_twin(cfg))}
        reps = [measure(runs, (B, S), cfg.model.vocab_size, args.steps) for _ in range(max(1, args.repeats))]
        rs = [ratios(r, "moe", "dense") for r in reps]
        mid = sorted(range(len(reps)), key=lambda i: rs[i]["wall"])[len(reps) // 2]  # the median repeat
        res = {"config": args.config, "overrides": args.overrides, "batch": B, "seq_len": S, "threads": args.threads,
               **reps[mid], "ratio_moe_over_dense": rs[mid]["wall"],
               "ratio_moe_over_dense_cpu_time": statistics.median(r["cpu_time"] for r in rs),
               "repeats": [{"wall": r["wall"], "cpu_time": r["cpu_time"]} for r in rs]}
    res["allocator"], res["load_average"] = allocator_description(), os.getloadavg()
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
