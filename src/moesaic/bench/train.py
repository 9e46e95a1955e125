"""``moesaic bench train``: end-to-end training-step tokens/s of a Mixtral-style LM in transformers against the
same weights imported into moesaic (:func:`moesaic.interop.hf.from_hf`), as a user would compare them.

Shapes (the reference protocol of the project's shared benchmark ``train_step_vs_transformers.py``): a
4-layer ``MixtralForCausalLM``, d_model 256, 4 heads, vocab 4096, untied embeddings, seq 256, batch 8, fp32,
router jitter 0, balance loss 0.01, transformers' ``grouped_mm`` experts; ``mixtral`` = 8 experts top-2 of
width 512, ``fine`` = 64 experts top-8 of width 128. Step: forward, cross entropy plus the balance loss,
backward, AdamW (lr 1e-4), ``zero_grad``; for moesaic also :func:`moesaic.on_optimizer_step`.
Implementations run interleaved (each round runs each once, order alternating), median step time after
warm-up steps. ``--activation-checkpointing`` adds moesaic with every block checkpointed (its bytes saved
for backward and its time beside the others). Output: one line per shape and a JSON file on request.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import moesaic
from moesaic.bench.measure import run_header, saved_bytes
from moesaic.core.allocator import allocator_description
from moesaic.core.errors import MoesaicError
from moesaic.models.transformer import TransformerBody

TARGET = "train"
B, S, V, D, L, H = 8, 256, 4096, 256, 4, 4
SHAPES: dict[str, dict[str, Any]] = {
    "mixtral": dict(intermediate_size=512, num_local_experts=8, num_experts_per_tok=2),
    "fine": dict(intermediate_size=128, num_local_experts=64, num_experts_per_tok=8),
}
Step = Callable[[], None]


def hf_model(shape: str, seed: int = 0) -> nn.Module:
    """transformers' ``MixtralForCausalLM`` with ``grouped_mm`` experts at the reference shape."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                        num_key_value_heads=H, max_position_embeddings=S, tie_word_embeddings=False,
                        router_jitter_noise=0.0, output_router_logits=True, router_aux_loss_coef=0.01,
                        **SHAPES[shape])
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg)


def ms_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    aux: torch.Tensor = moesaic.collect_aux_losses(model)
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)) + aux


def steps(shape: str, checkpointing: bool) -> dict[str, tuple[nn.Module, Step]]:
    """The training-step closures of every implementation, on one shared weight initialisation."""
    from moesaic.interop.hf import from_hf

    hf = hf_model(shape)
    models: dict[str, nn.Module] = {"transformers grouped_mm": hf, "moesaic": from_hf(hf)}
    if checkpointing:
        ck = from_hf(hf)
        body = ck.model
        assert isinstance(body, TransformerBody)
        body.set_activation_checkpointing(True)
        models["moesaic checkpointed"] = ck
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(0))
    out: dict[str, tuple[nn.Module, Step]] = {}
    for name, m in models.items():
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step(m: nn.Module = m, opt: torch.optim.Optimizer = opt, hf_side: bool = name.startswith("transf")
                 ) -> None:
            loss = m(input_ids=ids, labels=ids).loss if hf_side else ms_loss(m, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if not hf_side:
                moesaic.on_optimizer_step(m, 0)

        out[name] = (m, step)
    return out


def measure(runs: dict[str, tuple[nn.Module, Step]], repeats: int, warmup: int, clock: str) -> dict[str, float]:
    """Median seconds per step, implementations interleaved (order reversed every other round)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    names = list(runs)
    for _ in range(warmup):
        for n in names:
            runs[n][1]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = now()
            runs[n][1]()
            times[n].append(now() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def saved_mib(model: nn.Module, hf_side: bool) -> float:
    """Bytes autograd keeps for backward in one training forward (saved-tensor hooks), in MiB."""
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    n, _ = saved_bytes(lambda: model(input_ids=ids, labels=ids).loss if hf_side else ms_loss(model, ids))
    return n / 2**20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default="mixtral,fine", help="comma-separated: mixtral (E8 k2 F512), fine (E64 k8 F128)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="default: every core")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time (loaded machine, --threads 1); labelled in the output")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="also time moesaic with every block checkpointed, and report saved bytes")
    p.add_argument("--json", default="", help="write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            raise MoesaicError(f"bench train: --shapes {s!r} must be one of {', '.join(SHAPES)}")
    try:
        import transformers  # noqa: F401 - the peer; from the `bench` extra
    except ImportError as e:
        raise MoesaicError(f"bench train needs transformers (pip install 'moesaic[bench]'): {e}") from e
    torch.set_num_threads(args.threads)
    print(run_header(args.clock, f"batch {B} x seq {S}, fp32, AdamW"), flush=True)
    results: dict[str, Any] = {"threads": args.threads, "clock": args.clock, "allocator": allocator_description(),
                               "shapes": {}}
    for shape in shapes:
        runs = steps(shape, args.activation_checkpointing)
        med = measure(runs, args.repeats, args.warmup, args.clock)
        tps = {n: B * S / t for n, t in med.items()}
        peer = tps["transformers grouped_mm"]
        row: dict[str, Any] = {"tokens_per_s": tps, "median_step_s": med,
                               "moesaic_over_transformers": tps["moesaic"] / peer}
        if args.activation_checkpointing:
            row["saved_MiB"] = {n: saved_mib(m, n.startswith("transf")) for n, (m, _) in runs.items()}
        results["shapes"][shape] = row
        cfg = SHAPES[shape]
        print(f"{shape} (E{cfg['num_local_experts']} k{cfg['num_experts_per_tok']} F{cfg['intermediate_size']}): "
              + ", ".join(f"{n} {v:.0f} tok/s" for n, v in tps.items())
              + f"; moesaic / transformers = {row['moesaic_over_transformers']:.2f}"
              + ("; saved MiB " + ", ".join(f"{n} {v:.1f}" for n, v in row["saved_MiB"].items())
                 if "saved_MiB" in row else ""), flush=True)
    results["load_average"] = os.getloadavg()
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.json)
    return 0
