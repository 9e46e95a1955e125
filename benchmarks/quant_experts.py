"""Perplexity, expert memory, bits per weight and decode speed of weight-only compressed experts
(docs/inference.md, "Compressed experts"): fp32 against int8, int4 (groups of 64 and 32), the usage plan and
QMoE-style dictionary-coded ternary experts (per group of 64 and per row; data-free TWN values and GPTQ on
calibration windows), on trained checkpoints' held-out
windows (the data the checkpoint names); evaluation and decoding interleaved over the modes per repeat.

Usage: ``python benchmarks/quant_experts.py CKPT [CKPT ...] [--threads 1] [--repeats 3] [--modes ...]
[--json out.json]``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

import moesaic
from moesaic.bench.measure import time_interleaved
from moesaic.core.config import dump_yaml, loads_yaml
from moesaic.inference.quant import QuantConfig, quantize_experts_
from moesaic.inference.quant_gptq import expert_hessians
from moesaic.inference.quant_plan import expert_usage
from moesaic.inference.quant_ternary import TernaryExperts, ternarize_groups
from moesaic.inference.tunstall import TunstallCode, entropy_bits
from moesaic.train.run_config import load_run_config
from moesaic.train.task import eval_batch_size, evaluate, select_task

MODES = {"fp32": None, "int8": QuantConfig(bits=8, group_size=64), "int4 g64": QuantConfig(bits=4, group_size=64),
         "int4 g32": QuantConfig(bits=4, group_size=32), "plan (hot 50 % int8)": QuantConfig(plan=True),
         "ternary g64": QuantConfig(ternary=True, group_size=64),
         "ternary row": QuantConfig(ternary=True, group_size=0),
         "ternary g64 GPTQ": QuantConfig(ternary=True, group_size=64, gptq=True),
         "ternary row GPTQ": QuantConfig(ternary=True, group_size=0, gptq=True)}


def _ternary_info(q: dict[str, TernaryExperts]) -> dict:
    """Rates of the stored code against the entropy, plain 2-bit packing and 5 trits per byte; round trip."""
    n = sum(x.num_weights() for x in q.values())
    counts = sum(x.get_buffer("counts3") for x in q.values())
    assert isinstance(counts, torch.Tensor)
    c8 = 0
    for x in q.values():  # the same values with byte codewords; and every expert decodes to its values exactly
        code8 = TunstallCode(x.get_buffer("counts3"), 8)
        for p in ("up", "down"):
            for e in range(x.num_experts):
                t = x.ternary_values(p, e)
                s = TunstallCode.symbols(t)
                c8 += code8.encode(s).numel()
                assert torch.equal(code8.decode_values(code8.encode(s), t.numel()), t.flatten())
    scale_bits = 8 * sum(x.get_buffer(f"s3_{p}").numel() * 4 for x in q.values() for p in ("up", "down")) / n
    return {"zero_fraction": float(counts[0]) / n, "entropy_bits": entropy_bits(counts),
            "code_bits_16": sum(x.code_bits_per_weight() * x.num_weights() for x in q.values()) / n,
            "code_bits_8": 8 * c8 / n, "scale_bits": scale_bits, "bits_per_weight": 8 * sum(
                x.nbytes() for x in q.values()) / n}


def one_checkpoint(path: str, repeats: int, modes: list[str], new_tokens: int) -> dict:
    base = moesaic.load(path)
    cfg = load_run_config(data=loads_yaml(dump_yaml(base.run_config)))
    data = cfg.data.build()
    task = select_task(cfg, data)
    batches = data.eval_batches(eval_batch_size(cfg.train))
    loader = data.loader(seed=1234)
    calib = [{"input_ids": loader.next_batch(8)["input_ids"]} for _ in range(4)]
    prompt = batches[0]["input_ids"][:1, :32]
    fp = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if ".experts." in n)
    models, info = {}, {}
    for name in modes:
        qcfg = MODES[name]
        m = copy.deepcopy(base).eval()
        info[name] = {"expert_bytes": fp, "bits_per_weight": 32.0}
        if qcfg is not None:
            usage = expert_usage(m, calib) if qcfg.plan else None
            t0 = time.perf_counter()
            hess = expert_hessians(m, calib) if qcfg.gptq else None
            q = quantize_experts_(m, qcfg, usage, hess)
            nb = sum(x.nbytes() for x in q.values())
            bits = [b for x in q.values() for b in x.bits_E]
            info[name] = {"ratio": nb / fp, "expert_bytes": nb, "bits_per_weight": 32 * nb / fp,
                          "quantize_s": time.perf_counter() - t0, "int8": bits.count(8), "int4": bits.count(4),
                          "pruned": bits.count(0)}
            tq = {k: v for k, v in q.items() if isinstance(v, TernaryExperts)}
            if tq:
                info[name].update(_ternary_info(tq))
            if tq and not qcfg.gptq:
                for lname, ex in tq.items():  # the stored values are the TWN rule's on the checkpoint weights
                    src = dict(base.named_modules())[lname].experts
                    t, _ = ternarize_groups(src.w_up_EHD, qcfg.group_size)
                    assert all(torch.equal(ex.ternary_values("up", e), t[e]) for e in range(ex.num_experts))
        models[name] = m
    times: dict[str, list[float]] = {n: [] for n in models}
    loss: dict[str, float] = {}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, m in models.items():
                t = time.perf_counter()
                loss[name] = float(evaluate(m, task, batches)["val_loss"])
                times[name].append(time.perf_counter() - t)
        dec = time_interleaved({n: (lambda m=m: moesaic.generate(m, prompt, new_tokens)) for n, m in models.items()},
                               repeats, warmup=1)
    return {n: {"val_loss": loss[n], "ppl": float(torch.tensor(loss[n]).exp()), "eval_s": statistics.median(times[n]),
                "decode_tok_s": new_tokens / dec[n], **info[n]} for n in models}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    modes = ["fp32", *[m for m in a.modes if m != "fp32"]]
    load0 = os.getloadavg()
    res = {c: one_checkpoint(c, a.repeats, modes, a.new_tokens) for c in a.checkpoints}
    load1 = os.getloadavg()
    print(f"threads {a.threads}  load average at start {load0[0]:.2f}, at end {load1[0]:.2f}")
    for c, rows in res.items():
        print(c)
        for n, r in rows.items():
            rel = r["ppl"] / rows["fp32"]["ppl"] - 1
            print(f"  {n:22s} val_loss {r['val_loss']:.5f}  ppl {r['ppl']:.3f} ({100 * rel:+.3f} %)  "
                  f"expert bytes {r['expert_bytes']} (x{r.get('ratio', 1.0):.3f}, {r['bits_per_weight']:.3f} bits/w)  "
                  f"eval {r['eval_s']:.2f} s  decode {r['decode_tok_s']:.1f} tok/s")
            if "entropy_bits" in r:
                print(f"  {'':22s} zeros {r['zero_fraction']:.3f}  entropy {r['entropy_bits']:.3f}  code16 "
                      f"{r['code_bits_16']:.3f}  code8 {r['code_bits_8']:.3f}  scales {r['scale_bits']:.3f} bits/w")
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"load_average": [load0, load1], "threads": a.threads, "results": res}, f, indent=1)
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
