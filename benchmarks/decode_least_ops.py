"""How fast can eager PyTorch decode the reference model? A hand-written least-ops decode beside the libraries.

The reference protocol's model (``../shared/bench/decode_vs_transformers.py``: 4 layers, d=512, Mixtral-style,
fp32, greedy, prompt 32, 64 new tokens) decoded three ways, interleaved in one process (medians):
transformers' ``generate``, ``moesaic.generate`` on the ``from_hf`` import, and a plain function written with as
few ops as the model allows (fused q/k/v weights, a precomputed RoPE table, ``topk`` routing, no input checks,
no statistics, no cache object). It is not a library: it exists to bound what per-op overhead costs on this
machine. Its prompt is fed token by token, so besides tokens/s of the whole call (prompt included, as the
reference protocol reports) the script prints decode-only tokens/s, ``63 / (t(64 new) - t(1 new))``, for all three.

``python benchmarks/decode_least_ops.py --threads 2 --shape E8|E64 --repeats 5``; docs/benchmarks.md, "Decode".
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = {"E8": dict(intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2),
          "E64": dict(intermediate_size=256, num_local_experts=64, num_experts_per_tok=8)}
V, P, N, D, H = 4096, 32, 64, 512, 8


def least_ops_decoder(hf: torch.nn.Module, k: int, theta: float):
    """``gen(ids_1P) -> list of N new token ids`` over ``hf``'s weights with the fewest ops per step."""
    m, d = hf.model, D // H
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    ang = torch.arange(P + N).float()[:, None] * inv[None]
    cos_Pd, sin_Pd = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    layers = [dict(ln1=L.input_layernorm.weight, ln2=L.post_attention_layernorm.weight,
                   qkv=torch.cat([L.self_attn.q_proj.weight, L.self_attn.k_proj.weight, L.self_attn.v_proj.weight]),
                   o=L.self_attn.o_proj.weight, gate=L.mlp.gate.weight, up=L.mlp.experts.gate_up_proj,
                   down=L.mlp.experts.down_proj, eps=L.input_layernorm.variance_epsilon) for L in m.layers]

    def rms(x, w, eps):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rot(x, c, s):
        x1, x2 = x.chunk(2, -1)
        return x * c + torch.cat((-x2, x1), -1) * s

    def step(tok, p, cache):
        h = m.embed_tokens.weight[tok].view(1, D)
        c, s = cos_Pd[p], sin_Pd[p]
        for w, (kc, vc) in zip(layers, cache):
            q, kk, v = F.linear(rms(h, w["ln1"], w["eps"]), w["qkv"]).view(3, H, 1, d).unbind(0)
            kc[:, p], vc[:, p] = rot(kk, c, s)[:, 0], v[:, 0]
            o = F.scaled_dot_product_attention(rot(q, c, s), kc[:, :p + 1], vc[:, :p + 1])
            h = h + F.linear(o.reshape(1, D), w["o"])
            x = rms(h, w["ln2"], w["eps"])
            wv, ids = F.linear(x, w["gate"]).softmax(-1).topk(k)
            y = None
            for e, we in zip(ids.tolist()[0], (wv / wv.sum()).tolist()[0]):
                g, u = F.linear(x, w["up"][e]).chunk(2, -1)
                t = F.linear(F.silu(g) * u, w["down"][e]) * we
                y = t if y is None else y + t
            h = h + y
        return F.linear(rms(h, m.norm.weight, m.norm.variance_epsilon), hf.lm_head.weight).argmax(-1)

    def gen(ids_1P: torch.Tensor, n: int = N) -> list[int]:
        cache = [(torch.zeros(H, P + N, d), torch.zeros(H, P + N, d)) for _ in layers]
        for p in range(P):
            tok = step(ids_1P[0, p], p, cache)
        out = []
        for i in range(n):
            out.append(int(tok))
            tok = step(tok, P + i, cache)
        return out

    return gen


def main() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    import moesaic
    from moesaic.interop.hf import from_hf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shape", choices=list(SHAPES), default="E8")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=V, hidden_size=D, num_hidden_layers=4, num_attention_heads=H,
                        num_key_value_heads=H, max_position_embeddings=256, tie_word_embeddings=False,
                        router_jitter_noise=0.0, **SHAPES[args.shape])
    cfg._experts_implementation = "grouped_mm"
    hf = MixtralForCausalLM(cfg).eval()
    ms = from_hf(hf).eval()
    theta = float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"])
    gen = least_ops_decoder(hf, cfg.num_experts_per_tok, theta)
    ids = torch.randint(0, V, (1, P))
    def runs(n: int) -> dict[str, Callable[[], object]]:
        return {"transformers": lambda: hf.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n),
                "moesaic": lambda: moesaic.generate(ms, ids, n), "least ops": lambda: gen(ids, n)}

    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        ref = hf.generate(ids, max_new_tokens=N, do_sample=False, min_new_tokens=N)[0, P:].tolist()
        same = ref == moesaic.generate(ms, ids, N)[0, P:].tolist() == gen(ids)
        for _ in range(args.repeats):
            for n in (N, 1):
                for k, f in runs(n).items():
                    t = time.perf_counter()
                    f()
                    times.setdefault((k, n), []).append(time.perf_counter() - t)
    med = {key: statistics.median(v) for key, v in times.items()}
    names = ["transformers", "moesaic", "least ops"]
    whole = {k: N / med[(k, N)] for k in names}
    decode = {k: (N - 1) / (med[(k, N)] - med[(k, 1)]) for k in names}
    for label, tps in (("whole call", whole), ("decode only", decode)):
        print(f"{args.shape}, {torch.get_num_threads()} threads, {label}: "
              + ", ".join(f"{k} {v:.1f} tok/s" for k, v in tps.items())
              + f"; moesaic / transformers {tps['moesaic'] / tps['transformers']:.2f}, least ops / transformers "
              f"{tps['least ops'] / tps['transformers']:.2f}")
    print(f"same tokens: {same}")


if __name__ == "__main__":
    main()
