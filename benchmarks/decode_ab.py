"""Decode A/B against an earlier commit of moesaic, interleaved in one process (medians), with bitwise checks.

``python benchmarks/decode_ab.py --base COMMIT [--threads 1] [--shape E8|E64] [--repeats 7]`` exports
``src/moesaic`` of ``COMMIT`` (``git archive``) into a temporary folder as the package ``moesaic_base``, imports
it beside the working tree's ``moesaic`` and, on the reference protocol's model (4 layers, d=512, Mixtral-style,
``from_hf`` of the same transformers weights, fp32, prompt 32, 64 new tokens):

* checks that greedy tokens and the next-token logits of every step are bitwise equal, alone and for a
  left-padded batch of 3 prompts;
* times one multi-head attention call at T=1 (40 cached positions, static cache) and one RMSNorm call;
* times ``moesaic.generate`` per token, and the same with every MoE layer replaced by an identity (what is
  left is the decode path outside the MoE layer: attention, RoPE, norms, residuals, LM head, session and
  sampling);
* counts top-level aten op calls per decode token (torch.profiler).

Each pair runs interleaved (shuffled per round). docs/benchmarks.md, "Decode: the weight-reading floor".
"""

from __future__ import annotations

import argparse
import copy
import importlib
import io
import json
import random
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SHAPES = {"E8": dict(intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2),
          "E64": dict(intermediate_size=256, num_local_experts=64, num_experts_per_tok=8)}


def export_base(commit: str, dest: Path) -> None:
    """``src/moesaic`` of ``commit`` as the package ``moesaic_base`` under ``dest``."""
    root = Path(__file__).resolve().parents[1]
    tar = subprocess.run(["git", "-C", str(root), "archive", commit, "src/moesaic"], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")
    pkg = dest / "moesaic_base"
    (dest / "src" / "moesaic").rename(pkg)
    for f in pkg.rglob("*.py"):
        s = f.read_text()
        s = re.sub(r"\bmoesaic\.", "moesaic_base.", s)
        s = s.replace("from moesaic import", "from moesaic_base import")
        s = re.sub(r"^import moesaic$", "import moesaic_base as moesaic", s, flags=re.M)
        f.write_text(s)


def medians(fns: dict[str, Callable[[], Any]], rounds: int, inner: int = 1) -> dict[str, float]:
    t: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):
        random.Random(r).shuffle(order)
        for k in order:
            s = time.perf_counter()
            for _ in range(inner):
                fns[k]()
            t[k].append((time.perf_counter() - s) / inner)
    return {k: statistics.median(v) for k, v in t.items()}


def op_calls(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the commit to compare with")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shape", choices=list(SHAPES), default="E8")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    export_base(args.base, Path(tmp.name))
    sys.path.insert(0, tmp.name)
    from transformers import MixtralConfig, MixtralForCausalLM

    import moesaic
    from moesaic.inference.kv_cache import StaticKVCache
    from moesaic.inference.sampling import SamplingParams
    from moesaic.inference.session import DecodeSession
    from moesaic.interop.hf import from_hf
    from moesaic.models.rope import RotaryAngles
    mb: Any = importlib.import_module("moesaic_base")
    b_hf: Any = importlib.import_module("moesaic_base.interop.hf")
    b_session: Any = importlib.import_module("moesaic_base.inference.session")
    b_sampling: Any = importlib.import_module("moesaic_base.inference.sampling")
    b_kv: Any = importlib.import_module("moesaic_base.inference.kv_cache")

    torch.manual_seed(0)
    V, P, N = 4096, 32, 64
    cfg = MixtralConfig(vocab_size=V, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False,
                        router_jitter_noise=0.0, **SHAPES[args.shape])
    hf = MixtralForCausalLM(cfg).eval()
    new, old = from_hf(hf).eval(), b_hf.from_hf(hf).eval()
    ids = torch.randint(0, V, (1, P))
    prompts = [ids[0, :7].tolist(), ids[0].tolist(), ids[0, 3:20].tolist()]
    row: dict[str, Any] = {"shape": args.shape, "threads": args.threads, "base": args.base}

    def logits(session: Any, params: Any, m: Any, ps: list[list[int]], n: int) -> torch.Tensor:
        s = session(m, len(ps), P + N, keep_logits=True)
        sids = s.add_batch(ps, [params(max_new_tokens=n)] * len(ps))
        got: dict[int, list[torch.Tensor]] = {i: [] for i in sids}
        s.run(lambda ev: got[ev.seq_id].append(ev.logits))
        return torch.stack([torch.stack(got[i]) for i in sids])

    with torch.inference_mode():
        one = [ids[0].tolist()]
        row["logits_bitwise_equal_batch1"] = torch.equal(
            logits(DecodeSession, SamplingParams, new, one, N),
            logits(b_session.DecodeSession, b_sampling.SamplingParams, old, one, N))
        row["logits_bitwise_equal_left_padded_batch3"] = torch.equal(
            logits(DecodeSession, SamplingParams, new, prompts, 20),
            logits(b_session.DecodeSession, b_sampling.SamplingParams, old, prompts, 20))
        row["tokens_equal"] = torch.equal(moesaic.generate(new, ids, N), mb.generate(old, ids, N))

        x, pos = torch.randn(1, 1, 512), torch.tensor([[40]])
        k0, v0 = torch.randn(1, 8, 40, 64), torch.randn(1, 8, 40, 64)
        cn, co = StaticKVCache(1, 128), b_kv.StaticKVCache(1, 128)
        for c in (cn, co):
            c.view(slice(0, 1), 0, 0).update(0, k0, v0)
        vn, vo = cn.view(slice(0, 1), 0, 40), co.view(slice(0, 1), 0, 40)
        an, ao = new.model.layers[0].self_attn, old.model.layers[0].self_attn
        rope = RotaryAngles(pos)
        assert torch.equal(an(x, pos, None, vn, rope=rope), ao(x, pos, None, vo))
        nn_, no = new.model.layers[0].input_layernorm, old.model.layers[0].input_layernorm
        parts = {"attention_base": lambda: ao(x, pos, None, vo),
                 "attention_new": lambda: an(x, pos, None, vn, rope=rope),
                 "rmsnorm_base": lambda: no(x), "rmsnorm_new": lambda: nn_(x)}
        for k, v in medians(parts, 15 * args.repeats, 10).items():
            row[f"{k}_us"] = round(v * 1e6, 1)
        for k in ("attention_base", "attention_new"):
            row[f"{k}_ops"] = op_calls(parts[k])

        new0, old0 = copy.deepcopy(new), copy.deepcopy(old)
        for m in (new0, old0):
            for layer in m.model.layers:
                layer.mlp = torch.nn.Identity()
        gens = {"generate_base": lambda: mb.generate(old, ids, N),
                "generate_new": lambda: moesaic.generate(new, ids, N),
                "no_moe_base": lambda: mb.generate(old0, ids, N), "no_moe_new": lambda: moesaic.generate(new0, ids, N)}
        assert torch.equal(gens["no_moe_base"](), gens["no_moe_new"]())
        for k, v in medians(gens, args.repeats).items():
            row[f"{k}_us_per_token"] = round(v / N * 1e6)
        for k, f in gens.items():
            row[f"{k}_ops_per_token"] = round(op_calls(f) / N, 1)
    print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
