"""``moesaic bench layer``: forward and forward+backward time and memory of one MoE layer, every moesaic
expert backend against two floors and the transformers peers (docs/benchmarks.md, ``moesaic bench layer``).

Before anything is timed, every implementation runs once in fp32 on the same input, and the outputs of
implementations of one family (same routing semantics, identical copied weights) must agree within
``--atol`` (default 1e-4 at D=512) with that family's reference (moesaic ``loop``); otherwise
:class:`BenchMismatchError` names the implementation. ``bf16`` runs under ``torch.autocast`` (fp32 weights
and input, bf16 matmuls, fp32 router). Output: a markdown table and a JSON list of rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from moesaic.bench.impls import Impl, floor_impls, moesaic_impls, peer_impls
from moesaic.bench.measure import peak_growth, run_header, saved_bytes, time_interleaved
from moesaic.core.allocator import allocator_description
from moesaic.core.errors import MoesaicError
from moesaic.moe.layer import MoELayer

TARGET = "layer"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class BenchMismatchError(MoesaicError):
    """An implementation's output differs from its family's reference on identical weights."""


def build_impls(D: int, Fd: int, E: int, k: int, T: int, names: Sequence[str] | None = None, peers: bool = True,
                extra: Callable[[list[Impl]], list[Impl]] | None = None) -> tuple[list[Impl], list[str]]:
    """Implementations for one size whose name contains one of ``names`` (all when empty; floors always),
    plus each needed family reference (untimed); ``extra(impls)`` may add more."""
    from moesaic.moe.experts.backends import BACKENDS

    wanted = (lambda n: any(n == s[1:] if s.startswith("=") else s in n for s in names)) if names else (lambda n: True)
    fams = {"mixtral": "", "olmoe": " (olmoe)", "qwen2": " (qwen2)"}
    peer_fam = {"mixtral": "Mixtral", "olmoe": "OLMoE", "qwen2": "Qwen2-MoE"}
    impls: list[Impl] = []
    refs: dict[str, MoELayer] = {}
    notes: list[str] = []
    for fam, suffix in fams.items():
        all_b = ["auto", *BACKENDS.names()] if fam == "mixtral" else ["loop", "auto"]
        backends = [b for b in all_b if wanted(f"moesaic {b}{suffix}")]
        peer_names = [f"transformers {peer_fam[fam]} {v}" for v in ("eager", "grouped_mm")]
        if not (backends or (peers and any(map(wanted, peer_names))) or (extra and fam == "mixtral")):
            continue
        fam_impls = moesaic_impls(D, Fd, E, k, backends=backends, family=fam)
        ref = fam_impls[0].run
        assert isinstance(ref, MoELayer)  # moesaic_impls lists the family's loop layer first
        refs[fam] = ref
        impls += fam_impls
    if peers:
        p, why = peer_impls(D, Fd, E, k, refs, wanted=lambda n: wanted(n) and any(f in n for f in (
            peer_fam[f] + " " for f in refs)))
        impls += p
        notes += [why] if why else []
    impls += floor_impls(D, Fd, E, k, T)
    impls += extra(impls) if extra else []
    return impls, notes


def check_outputs(impls: Sequence[Impl], x_TD: torch.Tensor, atol: float) -> dict[str, float]:
    """Max abs difference of every routed implementation against its family's moesaic ``loop``."""
    refs: dict[str, torch.Tensor] = {}
    diffs: dict[str, float] = {}
    with torch.no_grad():
        outs = {i.name: i.run(x_TD) for i in impls if i.family != "floor"}
    for i in impls:
        if i.family != "floor" and i.name.startswith("moesaic loop"):
            refs[i.family] = outs[i.name]
    for i in impls:
        if i.family == "floor" or i.family not in refs:
            continue
        ref, y = refs[i.family], outs[i.name]
        d = float((y.float() - ref.float()).abs().max()) if y.shape == ref.shape else math.inf
        diffs[i.name] = d
        if not d <= atol * max(1.0, float(ref.abs().max())):
            raise BenchMismatchError(f"bench layer: {i.name!r} output differs from moesaic loop "
                                     f"({i.family} family) by {d:.3g} > atol {atol:g} on identical weights")
    return diffs


def _clear(i: Impl) -> None:
    for p in i.params:
        p.grad = None


def _autocast(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager[object]:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def bench_config(T: int, E: int, k: int, D: int, Fd: int, dtypes: Sequence[str], repeats: int, warmup: int,
                 names: Sequence[str] | None = None, peers: bool = True, memory: bool = True, atol: float = 1e-4,
                 extra: Callable[[list[Impl]], list[Impl]] | None = None, device: torch.device | None = None,
                 backward: bool = True, clock: str = "wall", grad: str = "sum"
                 ) -> tuple[list[dict[str, Any]], list[str]]:
    device = device or torch.device("cpu")
    impls, notes = build_impls(D, Fd, E, k, T, names, peers, extra)
    checked = impls
    impls = [i for i in impls if i.timed]
    for i in checked:
        if isinstance(i.run, torch.nn.Module):
            i.run.to(device)
        for p in i.params:
            p.data = p.data.to(device)
    g = torch.Generator().manual_seed(T * 1000 + E)
    x_TD = torch.randn(T, D, generator=g).to(device)
    diffs = check_outputs(checked, x_TD, atol)
    rows: list[dict[str, Any]] = []
    for dname in dtypes:
        dtype = DTYPES[dname]

        def fwd(i: Impl, dtype: torch.dtype = dtype) -> torch.Tensor:
            with torch.no_grad(), _autocast(dtype, device):
                return i.run(x_TD)

        def fwd_bwd(i: Impl, clear: bool = True, dtype: torch.dtype = dtype) -> None:
            if clear:
                _clear(i)
            x = x_TD.detach().requires_grad_()
            with _autocast(dtype, device):
                y = i.run(x)
            if grad == "sum":  # what a user's y.sum().backward() sends: an expanded (stride-0) gradient
                y.sum().backward()
            else:
                y.backward(torch.ones_like(y))

        t_f: dict[str, float] = {}
        t_fb: dict[str, float] = {}
        if repeats > 0:  # --repeats 0: memory only
            t_f = time_interleaved({i.name: partial(fwd, i) for i in impls}, repeats, warmup, device,
                                   clock=clock)
            if backward:
                t_fb = time_interleaved({i.name: partial(fwd_bwd, i) for i in impls}, repeats, warmup, device,
                                        clock=clock)
        mem: dict[str, tuple[int, int]] = {}
        if memory:
            for i in impls:
                grads = sum(p.numel() * p.element_size() for p in i.params if p.requires_grad)
                _clear(i)
                peak = peak_growth(partial(fwd_bwd, i, clear=False), device) - grads
                _clear(i)
                x = x_TD.detach().requires_grad_()
                with _autocast(dtype, device):
                    sb, _ = saved_bytes(partial(i.run, x))
                mem[i.name] = (peak, sb)
        for i in impls:
            row: dict[str, Any] = {
                "T": T, "E": E, "k": k, "D": D, "F": Fd, "dtype": dname, "impl": i.name, "family": i.family,
                "fwd_ms": 1e3 * t_f[i.name] if t_f else None,
                "fwd_bwd_ms": 1e3 * t_fb[i.name] if t_fb else None,
                "max_abs_diff_fp32": diffs.get(i.name)}
            if i.name in mem:
                row["peak_MB"], row["saved_MB"] = mem[i.name][0] / 2**20, mem[i.name][1] / 2**20
            rows.append(row)
        lim = next(r for r in rows if r["impl"] == "limit" and r["dtype"] == dname)
        flo = next(r for r in rows if r["impl"] == "balanced floor" and r["dtype"] == dname)
        for r in rows:
            if r["dtype"] == dname and t_fb:
                r["fwd_bwd_vs_limit"] = r["fwd_bwd_ms"] / lim["fwd_bwd_ms"]
                r["fwd_bwd_vs_floor"] = r["fwd_bwd_ms"] / flo["fwd_bwd_ms"]
            if r["dtype"] == dname and t_f:
                r["fwd_vs_limit"] = r["fwd_ms"] / lim["fwd_ms"]
            if r["dtype"] == dname:
                if "peak_MB" in r and lim.get("peak_MB"):
                    r["peak_vs_limit"] = r["peak_MB"] / lim["peak_MB"]
    return rows, notes


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    cols = [("T", "T"), ("E", "E"), ("k", "k"), ("dtype", "dtype"), ("impl", "implementation"),
            ("fwd_ms", "fwd ms"), ("fwd_vs_limit", "fwd / limit"), ("fwd_bwd_ms", "fwd+bwd ms"),
            ("fwd_bwd_vs_limit", "fwd+bwd / limit"),
            ("fwd_bwd_vs_floor", "fwd+bwd / bal. floor"), ("peak_MB", "peak MB"),
            ("peak_vs_limit", "peak / limit"), ("saved_MB", "saved MB")]
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            cells.append("-" if v is None else f"{v:.3g}" if isinstance(v, float) and key.endswith(("limit", "floor"))
                         else f"{v:.1f}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def _eks(s: str) -> list[tuple[int, int]]:
    out = []
    for part in s.split(","):
        e, _, k = part.partition(":")
        out.append((int(e), int(k or 2)))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--T", type=_ints, default=[16, 512, 2048, 8192], help="token counts, e.g. 16,2048")
    p.add_argument("--E", type=_eks, default=[(8, 2), (32, 2), (64, 8)], help="experts:k pairs, e.g. 8:2,64:8")
    p.add_argument("--dtype", default="fp32,bf16", help="fp32, bf16 (autocast), fp16 (autocast)")
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--F", type=int, default=1024, help="expert hidden width (SwiGLU)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (0: memory only)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--impl", default="",
                   help="comma-separated name substrings to keep; =NAME: exact name (floors always kept)")
    p.add_argument("--no-peers", action="store_true", help="skip the transformers blocks")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--no-backward", action="store_true", help="time the forward only (decode)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time (for a loaded machine, with --threads 1); labelled in the output")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch intra-op threads (default: every core of the machine)")
    p.add_argument("--grad", choices=["sum", "dense"], default="sum",
                   help="upstream gradient of fwd+bwd: y.sum().backward() (expanded) or a dense tensor of ones")
    p.add_argument("--atol", type=float, default=1e-4, help="output agreement tolerance (fp32)")
    p.add_argument("--json", default="", help="write the rows as JSON here")
    p.add_argument("--markdown", default="", help="write the markdown table here")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace, extra: Callable[[list[Impl]], list[Impl]] | None = None) -> int:
    dtypes = [d for d in args.dtype.split(",") if d]
    for d in dtypes:
        if d not in DTYPES:
            raise MoesaicError(f"bench layer: --dtype {d!r} must be one of {', '.join(DTYPES)}")
    names = [n for n in args.impl.split(",") if n]
    torch.set_num_threads(args.threads)
    print(run_header(args.clock, f"grad={args.grad}"), flush=True)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for E, k in args.E:
        for T in args.T:
            r, n = bench_config(T, E, k, args.D, args.F, dtypes, args.repeats, args.warmup, names,
                                not args.no_peers, not args.no_memory, args.atol, extra, torch.device(args.device),
                                not args.no_backward, args.clock, args.grad)
            rows += r
            notes += [m for m in n if m not in notes]
            print(markdown(r), file=sys.stderr, flush=True)
    table = markdown(rows)
    print(table)
    for m in notes:
        print(f"note: {m}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "clock": args.clock,
                       "grad": args.grad, "allocator": allocator_description(), "load": os.getloadavg(),
                       "rows": rows}, f, indent=1)
    return 0
