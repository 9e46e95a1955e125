"""Expert memory and decode speed of int8 / int4 experts on the offloading benchmark model (docs/benchmarks.md,
"Compressed experts on the 4 GB benchmark model").

The model is the one of ``moesaic bench offload`` (:mod:`moesaic.bench.offload_worker`: 8 layers, d_model 1024,
16 gated experts of width 2816 per layer, k = 2, 4.43 GB of fp32 expert weights, seeded). One process per
mode (``--mode``, spawned by the parent with ``MOESAIC_MALLOC=default`` so freed fp32 experts go back to the
system): build the model, fill the experts, decode a prompt (fp32), quantize the experts in place
(:func:`moesaic.inference.quant.quantize_experts_`), decode again. Reported per mode: the expert tensors' bytes
(exact, from the modules), the process's ``RssAnon`` with fp32 experts and after quantizing, the prompt's logits
against fp32 (relative error, top-1 agreement per position), decode tokens/s before and after (batch 1,
greedy), how many greedy tokens agree with fp32, and the relative error of the first MoE layer's output on
the prompt (the same input before and after, so it isolates the weights' error). On this random-weight model
the routers' top-k margins are small, so an error of 1 % in one layer's output flips routing decisions of the
next layers and the logits move far more than the weights do (measured with 2 layers: 1.0 % at the first MoE
layer, 27 % at the second); the model's quality under quantization is measured on the trained demo model.

Usage: ``python benchmarks/quant_offload_model.py [--modes int8 int4] [--threads 2] [--prompt-len 32]
[--new-tokens 32] [--json out.json]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch

from moesaic.bench.measure import run_header

MODES = {"int8": (8, 64), "int4": (4, 64)}


def worker(mode: str, threads: int, prompt_len: int, new_tokens: int) -> dict:
    from moesaic.bench import offload_worker as W
    from moesaic.inference.offload import expert_modules
    from moesaic.inference.offload.transform import moe_layers
    from moesaic.inference.quant import QuantConfig, QuantizedExperts, quantize_experts_

    torch.set_num_threads(threads)
    s = W.Spec(dir="", prompt_len=prompt_len, new_tokens=new_tokens, threads=threads)
    model = W.build(s)
    rss0 = W.status_kib("RssAnon")
    W.fill_experts(model)
    fp32_bytes = sum(getattr(m, n).numel() * getattr(m, n).element_size()
                     for m in expert_modules(model).values() for n in m.stacked_names())
    rss_fp32 = W.status_kib("RssAnon")
    ids = torch.tensor([W.prompt(s)])
    first: list[torch.Tensor] = []
    _, moe0 = next(iter(moe_layers(model)))
    hook = moe0.register_forward_hook(lambda m, i, o: first.append((o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        ref_logits = model(ids).logits[0]
    hook.remove()
    ref = W.decode(model, s)
    bits, group = MODES[mode]
    quantize_experts_(model, QuantConfig(bits=bits, group_size=group))
    gc.collect()
    q_bytes = sum(m.nbytes() for m in model.modules() if isinstance(m, QuantizedExperts))
    rss_q = W.status_kib("RssAnon")
    _, moe0 = next(iter(moe_layers(model)))
    hook = moe0.register_forward_hook(lambda m, i, o: first.append((o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        q_logits = model(ids).logits[0]
    hook.remove()
    layer0 = float((first[1] - first[0]).norm() / first[0].norm())
    rel = float((q_logits - ref_logits).norm() / ref_logits.norm())
    top1 = float((q_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    out = W.decode(model, s)
    same = sum(a == b for a, b in zip(out["tokens"], ref["tokens"], strict=True))
    return {"mode": mode, "group_size": group, "fp32_expert_bytes": fp32_bytes, "expert_bytes": q_bytes,
            "expert_bytes_ratio": q_bytes / fp32_bytes, "rss_anon_mib": {"before_experts": rss0 // 1024,
                                                                       "fp32": rss_fp32 // 1024,
                                                                       "quantized": rss_q // 1024},
            "rss_experts_ratio": (rss_q - rss0) / max(1, rss_fp32 - rss0),
            "first_moe_layer_rel_error": layer0, "prompt_logits_rel_error": rel, "prompt_top1_agreement": top1,
            "tok_s_fp32": ref["tok_s"], "tok_s": out["tok_s"], "tokens_equal_fp32": same,
            "tokens": len(ref["tokens"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.threads, a.prompt_len, a.new_tokens)))
        return
    torch.set_num_threads(a.threads)
    print(run_header("wall", "one process per mode; expert bytes exact, RssAnon from /proc/self/status"), flush=True)
    env = dict(os.environ, MOESAIC_MALLOC="default")
    rows = []
    for mode in a.modes:
        cmd = [sys.executable, __file__, "--worker", mode, "--threads", str(a.threads), "--prompt-len",
               str(a.prompt_len), "--new-tokens", str(a.new_tokens)]
        r = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        rows.append(r)
        rss = r["rss_anon_mib"]
        print(f"{mode} (groups of {r['group_size']}): experts {r['expert_bytes'] / 1e9:.3f} GB = "
              f"{r['expert_bytes_ratio']:.3f}x of fp32 {r['fp32_expert_bytes'] / 1e9:.3f} GB; RssAnon "
              f"{rss['before_experts']} -> {rss['fp32']} (fp32) -> {rss['quantized']} MiB (experts "
              f"{r['rss_experts_ratio']:.3f}x); decode {r['tok_s_fp32']:.2f} -> {r['tok_s']:.2f} tok/s; "
              f"first MoE layer's output (same input): relative error {r['first_moe_layer_rel_error']:.4f}; "
              f"prompt logits: relative error {r['prompt_logits_rel_error']:.4f}, top-1 agreement "
              f"{r['prompt_top1_agreement']:.3f}; {r['tokens_equal_fp32']}/{r['tokens']} greedy tokens as fp32",
              flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()
