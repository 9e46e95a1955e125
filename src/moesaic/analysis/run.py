"""``moesaic analyze``: record a model's routing over a text sample and write ``report.html``,
``stats.json`` and the figures as PNG into a new folder (docs/analysis.md)."""

from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from moesaic.analysis import actions, cost, figures
from moesaic.analysis.report import image, page, table
from moesaic.analysis.sample import load_passages
from moesaic.analysis.stats import trace_stats
from moesaic.analysis.trace import Trace, moe_layers_of, record
from moesaic.core.errors import ConfigError


def check_out(out: Path) -> None:
    """The output folder must not exist (a report never overwrites anything)."""
    if out.exists():
        raise ConfigError("--out", str(out), "already exists; give a new folder (the report never overwrites)")
    if not out.parent.is_dir():
        raise ConfigError("--out", str(out), f"its parent folder {out.parent} does not exist")


def study(model: nn.Module, data: str | Path, where: str, *, passages: int = 256, seed: int = 0,
          ranks: int = 4, target_hit_rate: float = 0.9, timing: bool = True) -> tuple[dict[str, Any], Trace]:
    """Every number of the report for one model: routing statistics, actions and (``timing``) the cost model."""
    moe_layers_of(model, where)  # typed error before any work when there is nothing to analyze
    trace = record(model, load_passages(data, passages, seed), where=where)
    tok = getattr(model, "tokenizer", None)
    stats = trace_stats(trace, (lambda i: tok.decode([i])) if tok is not None else None)
    sal, why = actions.saliency(model, trace)
    stats["actions"] = {"prune": actions.prune_list(stats["layers"], saliency_E=sal), "saliency_note": why,
                        "cache": actions.cache_size(trace, target_hit_rate),
                        "placement": actions.placement(trace, ranks), "target_hit_rate": target_hit_rate}
    if timing:
        peaks = cost.machine_peaks()
        stats["machine"] = peaks
        stats["cost"] = cost.measure_layers(dict(moe_layers_of(model, where)), trace.layer_inputs, peaks)
    stats["source"] = {"model": where, "data": str(data), "passages": passages, "seed": seed}
    return stats, trace


def _figures(stats: dict[str, Any], trace: Trace, out: Path, prefix: str = "") -> list[tuple[str, Path]]:
    L = stats["layers"]
    figs = [("expert load per layer", figures.load_heatmap(L)), ("load imbalance", figures.imbalance_bars(L)),
            ("router confidence", figures.confidence(L, {lt.name: lt.conf_T2 for lt in trace.layers})),
            ("co-activation", figures.coactivation(L)), ("prefill vs decode", figures.phases(L))]
    if stats["affinity"]:
        figs.append(("inter-layer affinity", figures.affinity(stats["affinity"])))
    keys = sorted({k for s in L.values() for k in s["specialisation"]})
    if keys:
        figs.append(("specialisation (mutual information)", figures.mutual_information(L)))
    figs += [(f"specialisation by {k}", figures.specialisation(L, k)) for k in keys]
    if "cost" in stats:
        figs.append(("roofline", figures.roofline(stats["cost"], stats["machine"])))
    return [(t, figures.save(f, out / f"{prefix}{t.replace(' ', '_').replace('(', '').replace(')', '')}.png"))
            for t, f in figs]


def _summary(stats: dict[str, Any]) -> str:
    keys = sorted({k for s in stats["layers"].values() for k in s["specialisation"]})
    rows = [[n, s["tokens"], s["max_over_mean"], s["cv"], s["entropy_norm"], s["drop_rate"], s["top1_prob_mean"],
             s["margin_mean"], len(s["never_used"])] + [s["specialisation"].get(k, {}).get("mutual_information_bits")
                                                         for k in keys] for n, s in stats["layers"].items()]
    return table(["layer", "tokens", "max/mean", "CV", "entropy/log E", "drop rate", "top-1 prob", "margin",
                  "never used"] + [f"MI {k} (bits)" for k in keys], rows)


def _top_tokens(stats: dict[str, Any]) -> str:
    names = list(stats["layers"])
    parts = []
    for n in sorted({names[0], names[-1]}, key=names.index):
        rows = [[e, ", ".join(f"{t['text']!r}x{t['count']}" for t in toks[:6])]
                for e, toks in enumerate(stats["layers"][n]["top_tokens"])]
        parts.append(f"<h3>{n}</h3>" + table(["expert", "most frequent tokens (count)"], rows))
    return "".join(parts)


def _actions(stats: dict[str, Any]) -> str:
    a = stats["actions"]
    prune = table(["layer", "never used", "least used", "their share of assignments", "least salient",
                   "their share of saliency"],
                  [[n, p["never_used"] or "-", p["least_used"], p["least_used_share"], p.get("least_salient", "n/a"),
                    p.get("least_salient_share")] for n, p in a["prune"].items()])
    if a.get("saliency_note"):
        prune += f"<p>Saliency not measured: {html.escape(a['saliency_note'])}</p>"
    cache = table(["layer", f"experts cached for hit rate {a['target_hit_rate']}", "hit rate at that size"],
                  [[n, c["suggested"], c["curve"][c["suggested"] - 1] if c["suggested"] else None]
                   for n, c in a["cache"].items()])
    pl = a["placement"]
    place = ("<p>Not applicable (fewer than two MoE layers, unequal expert counts, or experts not divisible by "
             "the ranks).</p>" if pl is None else
             table(["candidate", "tokens changing rank between layers"],
                   [[k, v] for k, v in pl["traffic"].items() if k != "chosen"])
             + f"<p>chosen: {pl['traffic']['chosen']} for {pl['ranks']} ranks; per-layer rank of each expert in "
             "<code>stats.json</code>.</p>")
    return ("<h3>Prune candidates</h3>" + prune + "<h3>Expert cache size (LRU on the recorded decode steps)</h3>"
            + cache + "<h3>Placement (ExFlow)</h3>" + place)


def _cost(stats: dict[str, Any]) -> str:
    m = stats["machine"]
    rows = [[n, c["tokens"], c["experts_used"], c["flops"] / 1e6, c["bytes"] / 1e6, c["intensity"],
             c["roofline_s"] * 1e3, c["measured_s"] * 1e3, c["fraction_of_roofline"]] for n, c in stats["cost"].items()]
    return (f"<p>Machine: {m['peak_flops'] / 1e9:.1f} GFLOP/s fp32 matmul, {m['bandwidth_bytes'] / 1e9:.1f} GB/s copy, "
            f"{int(m['threads'])} threads (measured now).</p>" +
            table(["layer", "tokens", "experts used", "MFLOP", "MB moved", "FLOP/byte", "roofline ms", "measured ms",
                   "roofline / measured"], rows))


def _diff(a: dict[str, Any], b: dict[str, Any], out: Path) -> str:
    common = [n for n in a["layers"] if n in b["layers"] and
              len(a["layers"][n]["load"]) == len(b["layers"][n]["load"])]
    if not common:
        return "<p>The two models share no MoE layer of the same name and expert count: no per-expert differences.</p>"
    share = {}
    for n in common:
        la, lb = (np.asarray(x["layers"][n]["load"], dtype=float) for x in (a, b))
        share[n] = {"load": (lb / max(lb.sum(), 1) - la / max(la.sum(), 1)).tolist()}
    p = figures.save(figures.load_heatmap(share, "share of assignments: compared minus this model", diff=True),
                     out / "compare_load_difference.png")
    keys = sorted({k for s in a["layers"].values() for k in s["specialisation"]})
    rows = [[n] + [b["layers"][n][k] - a["layers"][n][k] for k in ("max_over_mean", "cv", "entropy_norm")]
            + [b["layers"][n]["specialisation"].get(k, {}).get("mutual_information_bits", 0.0)
               - a["layers"][n]["specialisation"].get(k, {}).get("mutual_information_bits", 0.0) for k in keys]
            for n in common]
    return image(p, "difference of expert load shares") + table(
        ["layer", "d max/mean", "d CV", "d entropy/log E"] + [f"d MI {k}" for k in keys], rows)


def analyze(model: nn.Module, data: str | Path, out: str | Path, *, where: str = "model",
            compare: nn.Module | None = None, compare_where: str = "compare", **kw: Any) -> Path:
    """Write ``out/report.html``, ``out/stats.json`` and PNG figures (``compare``: also the differences to a
    second model on the same passages). ``out`` must not exist; it appears complete or not at all."""
    out = Path(out)
    check_out(out)
    stats, trace = study(model, data, where, **kw)
    other = study(compare, data, compare_where, **kw) if compare is not None else None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        figs = _figures(stats, trace, tmp)
        sections = [("Summary per layer", _summary(stats) + "".join(image(p, t) for t, p in figs[:3])),
                    ("Co-activation and inter-layer affinity",
                     "".join(image(p, t) for t, p in figs if "co-activation" in t or "affinity" in t)),
                    ("Prefill vs decode", "".join(image(p, t) for t, p in figs if "prefill" in t)),
                    ("Specialisation", "".join(image(p, t) for t, p in figs if "specialisation" in t)),
                    ("Top tokens per expert", _top_tokens(stats)), ("Actions", _actions(stats))]
        if "cost" in stats:
            sections.append(("Cost model and roofline", _cost(stats) + "".join(image(p, t) for t, p in figs
                                                                                   if t == "roofline")))
        if other is not None:
            o_stats, o_trace = other
            o_figs = _figures(o_stats, o_trace, tmp, prefix="compare_")
            sections.append((f"Compared with {compare_where}", _diff(stats, o_stats, tmp) + _summary(o_stats)
                             + "".join(image(p, "compared: " + t) for t, p in o_figs[:2])))
            stats["compare"] = o_stats
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1, allow_nan=False, default=_json_default) + "\n")
        (tmp / "report.html").write_text(page(f"moesaic analyze: {where}", sections), encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
