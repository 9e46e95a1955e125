"""offload: decode tokens/s, hit rate and bytes read of offloaded experts against the resident fraction.

Protocol (docs/benchmarks.md, "Offloaded experts"): a seeded decoder LM (default 8 layers, d_model 1024,
16 gated experts of width 2816 per layer, k = 2: 4.43 GB of fp32 expert weights) is written once to a disk
expert store (``DIR/store``, mmap'd safetensors). Then every run is its own process (``--worker``, with
``MOESAIC_MALLOC=default`` so the freed resident weights go back to the system): the resident model (also
recording the routing trace the oracle reads), and for each resident fraction (cache slots per layer =
fraction x E, at least k), policy and prefetch mode the offloaded model, with the store's page cache
dropped (``posix_fadvise(POSIX_FADV_DONTNEED)``) just before the prompt. Reported: prefill seconds, decode
tokens/s (batch 1, greedy) and its ratio to resident, decode-only hit rate, MiB read, hint precision,
prefetch accuracy, resident expert memory (cache slots + the store's mapped pages) as a share of all
experts (and, with ``--paired``, the share of the mapped pages that the kernel maps with 2 MiB entries),
the process's ``RssAnon``, the store's bytes in the kernel's page cache at the end of the run
(``mincore``: memory the kernel spends besides the process's own), and whether the tokens equal the resident
run's. ``--slots map copy`` compares slots that map the store file's pages (zero copy, the default) with
slots that hold copies. At 100 % every
policy behaves alike (nothing is evicted), so that fraction runs once per prefetch mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

TARGET = "offload"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="bench-offload", help="work folder (the expert store and the trace)")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=2816, help="expert width")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fractions", type=int, nargs="+", default=[25, 50, 75, 100], help="resident %% of experts")
    p.add_argument("--policies", nargs="+", default=["lru", "lfu", "lfru", "oracle"])
    p.add_argument("--prefetch", nargs="+", default=["none", "pregate"], help="prefetch modes to compare")
    p.add_argument("--slots", nargs="+", default=["map"], choices=["map", "copy"],
                   help="cache slots that map the store's pages (zero copy) or hold copies; several compare")
    p.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                   help="interleave the resident model and every configuration in one process, ROUNDS times, "
                        "and report medians and per-round ratios (instead of one sweep)")
    p.add_argument("--json", default=None, help="write every run's results to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def _spawn(spec: Any, configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the worker; its JSON lines (one per configuration), echoed briefly as they come."""
    env = dict(os.environ, MOESAIC_MALLOC="default", OMP_NUM_THREADS=str(spec.threads))
    cmd = [sys.executable, "-m", "moesaic", "bench", "offload", "--worker",
           json.dumps({"spec": dataclasses.asdict(spec), "configs": configs})]
    out: list[dict[str, Any]] = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            if line.startswith("{"):
                out.append(json.loads(line))
                with open(Path(spec.dir) / "runs.jsonl", "a") as f:  # kept if a later run fails
                    f.write(line)
                r = out[-1]
                if "tok_s" in r:
                    print(f"  ran {r.get('policy')} {r.get('prefetch', '')} {r.get('fraction', '')}: "
                          f"{r['tok_s']:.2f} tok/s", file=sys.stderr, flush=True)
        err = proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"offload worker {spec.task} failed ({proc.returncode}): {err.strip()[-2000:]}")
    return out


def _row(cfg: dict[str, Any], r: dict[str, Any], base: dict[str, Any]) -> str:
    t = r["telemetry"]
    mem = (r["cache_bytes"] + r["mapped_bytes"]) / r["store_bytes"]
    same = "yes" if r["tokens"] == base["tokens"] else "NO"
    return (f"| {cfg['policy']} | {cfg['prefetch']} | {cfg['slots']} | {cfg['fraction']} % ({cfg['cache']}) | "
            f"{r['tok_s']:.2f} | {r['tok_s'] / base['tok_s']:.2f}x | {r['prefill_s']:.1f} | {t['hit_rate']:.3f} | "
            f"{t['bytes_read'] / 2**20:.0f} | {t['hint_precision']:.2f} | {t['prefetch_accuracy']:.2f} | "
            f"{100 * mem:.1f} % | {r['rss_anon_kib'] / 1024:.0f} | {r['page_cache_bytes'] / 2**20:.0f} | {same} |")


def run(args: argparse.Namespace) -> int:
    from moesaic.bench.offload_worker import Spec, work
    from moesaic.core.errors import ConfigError

    if args.worker is not None:
        w = json.loads(args.worker)
        work(Spec(**w["spec"]), w["configs"])
        return 0
    from moesaic.inference.offload.policies import CACHE_POLICIES
    from moesaic.inference.offload.prefetch import PREFETCH_MODES

    for p in args.policies:
        if p not in CACHE_POLICIES:
            raise ConfigError("--policies", p, f"must be among {', '.join(CACHE_POLICIES.names())}")
    for m in args.prefetch:
        if m not in PREFETCH_MODES:
            raise ConfigError("--prefetch", m, f"must be among {', '.join(PREFETCH_MODES)}")
    if any(not 0 < f <= 100 for f in args.fractions):
        raise ConfigError("--fractions", args.fractions, "each must be in (0, 100]")
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    base = Spec(dir=str(root), d_model=args.d_model, layers=args.layers, experts=args.experts, top_k=args.top_k,
                d_ff=args.d_ff, vocab=args.vocab, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                threads=args.threads)
    print(f"threads {args.threads}  load average {os.getloadavg()[0]:.2f}  model: {args.layers} layers, d_model "
          f"{args.d_model}, {args.experts} experts of width {args.d_ff}, k {args.top_k}; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens", flush=True)
    if not (root / "store" / "manifest.json").is_file():
        info = _spawn(dataclasses.replace(base, task="setup"), [])[0]
        print(f"wrote {root / 'store'}: {info['expert_bytes'] / 1e9:.2f} GB of fp32 expert weights", flush=True)
    configs = []
    for frac in args.fractions:
        cache = max(args.top_k, round(args.experts * frac / 100))
        for pf in args.prefetch:
            for pol in (args.policies if frac < 100 else args.policies[:1]):
                for sl in args.slots:
                    configs.append({"policy": pol, "prefetch": pf, "fraction": frac, "cache": cache, "slots": sl})
    first = next((i for i, c in enumerate(configs) if c["policy"] != "oracle"), None)
    if first is None:  # the oracle reads the trace of a first run: add one
        configs.insert(0, {"policy": "lru", "prefetch": "none", "fraction": args.fractions[0],
                           "cache": max(args.top_k, round(args.experts * args.fractions[0] / 100)),
                           "slots": args.slots[0]})
    else:
        configs.insert(0, configs.pop(first))
    if args.paired > 0:
        return _paired(args, base, [c for c in configs if c["fraction"] < 100 or c["policy"] == args.policies[0]])
    runs = _spawn(dataclasses.replace(base, task="sweep"), configs)
    resident = runs.pop()
    print(f"resident: decode {resident['tok_s']:.2f} tok/s, prefill {resident['prefill_s']:.1f} s, RssAnon "
          f"{resident['rss_anon_kib'] / 1024:.0f} MiB (load average {resident['load_average']:.1f})", flush=True)
    print("| policy | prefetch | slots | resident (cache/layer) | tok/s | vs resident | prefill s | hit rate | "
          "MiB read | hint precision | prefetch accuracy | expert memory | RssAnon MiB | page cache MiB | "
          "same tokens | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(runs, key=lambda r: (r["fraction"], r["prefetch"], r["policy"], r["slots"])):
        cfg = {**r, "policy": r["policy"] if r["fraction"] < 100 else "any"}
        print(_row(cfg, r, resident) + f" {r['load_average']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps([*runs, resident], indent=1))
    return 0


def _huge(r: dict[str, Any]) -> str:
    """The share of the store's mapped pages that the kernel maps with 2 MiB entries (docs/inference.md,
    "Huge-page entries"): 0 % where the kernel or file system keeps 4 KiB pages, or for copying slots."""
    return f"{100 * r['huge_mapped_bytes'] / r['mapped_bytes']:.0f} %" if r.get("mapped_bytes") else "-"


def _paired(args: argparse.Namespace, base: Any, configs: list[dict[str, Any]]) -> int:
    """``--paired``: resident and offloaded runs interleaved in one worker; a table of medians over rounds."""
    import statistics

    runs = _spawn(dataclasses.replace(base, task="paired", rounds=args.paired), configs)
    resident = {r["round"]: r for r in runs if r["policy"] == "resident"}
    tok_s = ", ".join(f"{r['tok_s']:.2f}" for r in resident.values())
    print(f"paired, {args.paired} rounds: resident decode tok/s {tok_s}", flush=True)
    print("| policy | prefetch | slots | resident (cache/layer) | tok/s (median) | vs resident, per round | median | "
          "hit rate | MiB read | expert memory | 2 MiB-mapped | page cache MiB | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cfg in configs:
        mine = [r for r in runs if r["policy"] != "resident" and all(r[k] == cfg[k] for k in cfg)]
        ratios = [r["tok_s"] / resident[r["round"]]["tok_s"] for r in mine]
        t, last = mine[-1]["telemetry"], mine[-1]
        mem = (last["cache_bytes"] + last["mapped_bytes"]) / last["store_bytes"]
        same = all(r["tokens"] == resident[r["round"]]["tokens"] for r in mine)
        print(f"| {cfg['policy']} | {cfg['prefetch']} | {cfg['slots']} | {cfg['fraction']} % ({cfg['cache']}) | "
              f"{statistics.median(r['tok_s'] for r in mine):.2f} | {', '.join(f'{x:.2f}' for x in ratios)} | "
              f"**{statistics.median(ratios):.2f}x** | {t['hit_rate']:.3f} | {t['bytes_read'] / 2**20:.0f} | "
              f"{100 * mem:.1f} % | {_huge(last)} | {last['page_cache_bytes'] / 2**20:.0f} | "
              f"{'yes' if same else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0
