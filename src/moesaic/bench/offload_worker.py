"""The worker process of ``moesaic bench offload`` (its memory is its own): ``setup`` builds the benchmark
model and writes the expert store; ``sweep`` builds the model without expert weights and, per
configuration (cache size, policy, prefetch), offloads to the disk store with fresh caches, drops the
store's page cache, prefills and decodes; finally the resident model (experts read from the store).

One JSON line per configuration: prefill seconds, decode tokens/s, the tokens, decode-only cache
telemetry, and memory (``RssAnon``/``RssFile`` from /proc/self/status, the cache slots' bytes, the
store's mapped pages from /proc/self/smaps).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from moesaic.inference import DecodeSession, SamplingParams
from moesaic.models.decoder import DecoderLM, DecoderLMConfig
from moesaic.moe.experts.stacked_ffn import FFNExperts
from moesaic.moe.layer import MoEConfig


@dataclasses.dataclass
class Spec:
    """The benchmark model and run (the parent fills it from the command line)."""

    dir: str
    d_model: int = 1024
    layers: int = 8
    experts: int = 16
    top_k: int = 2
    d_ff: int = 2816
    vocab: int = 4096
    prompt_len: int = 32
    new_tokens: int = 16
    threads: int = 1
    rounds: int = 0
    task: str = "sweep"


def build(s: Spec) -> DecoderLM:
    """The benchmark model: everything but the experts from seed 0, the experts left uninitialised (their
    pages untouched, so they cost no memory): :func:`fill_experts` gives them their values, or offloading
    replaces them. This keeps every run from drawing 4 GB of random numbers it would throw away."""
    torch.manual_seed(0)
    cfg = DecoderLMConfig(vocab_size=s.vocab, d_model=s.d_model, num_layers=s.layers, d_ff=s.d_ff,
                          max_seq_len=s.prompt_len + s.new_tokens + 8,
                          moe=MoEConfig(d_ff=s.d_ff, num_experts=s.experts, top_k=s.top_k))
    cfg.attention.num_heads = max(1, s.d_model // 64)
    init = FFNExperts.reset_parameters
    FFNExperts.reset_parameters = lambda self: None  # type: ignore[method-assign]
    try:
        model = DecoderLM(cfg)
    finally:
        FFNExperts.reset_parameters = init  # type: ignore[method-assign]
    for m in model.modules():  # the model-wide init wrote the experts: give them fresh, untouched pages
        if isinstance(m, FFNExperts):
            for n in m.stacked_names():
                setattr(m, n, torch.nn.Parameter(torch.empty_like(getattr(m, n))))
    return model.eval()


def fill_experts(model: torch.nn.Module) -> None:
    """The experts' weights: normal with std 1/sqrt(fan_in), from their own generator (seed 1)."""
    from moesaic.inference.offload import expert_modules

    g = torch.Generator().manual_seed(1)
    for ex in expert_modules(model).values():
        for n in ex.stacked_names():
            w = getattr(ex, n)
            with torch.no_grad():
                w.normal_(0.0, w.shape[-1] ** -0.5, generator=g)


def prompt(s: Spec) -> list[int]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, s.vocab, (s.prompt_len,), generator=g).tolist()


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def decode(model: torch.nn.Module, s: Spec, after_prefill: Any = None) -> dict[str, Any]:
    """Prefill the prompt (timed), then decode ``new_tokens - 1`` steps (timed)."""
    sess = DecodeSession(model, 1)
    t0 = time.perf_counter()
    with torch.no_grad():
        sess.add_batch([prompt(s)], [SamplingParams(max_new_tokens=s.new_tokens)])
    t1 = time.perf_counter()
    snap = after_prefill() if after_prefill is not None else None
    toks: list[int] = []
    sess.run(lambda ev: toks.append(ev.token_id))
    t2 = time.perf_counter()
    steps = max(1, len(toks) - 1)
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tok_s": steps / (t2 - t1), "tokens": toks,
            "snap": snap}


def _minus(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    keys = ("accesses", "hits", "misses", "loads", "bytes_read", "prefetch_loads", "prefetch_used", "hinted",
            "hinted_needed", "wait_s")
    d = {k: a[k] - b[k] for k in keys}
    d["hit_rate"] = d["hits"] / d["accesses"] if d["accesses"] else 0.0
    d["prefetch_accuracy"] = d["prefetch_used"] / d["prefetch_loads"] if d["prefetch_loads"] else 0.0
    d["hint_precision"] = d["hinted_needed"] / d["hinted"] if d["hinted"] else 0.0
    return d


def _offloaded(model: torch.nn.Module, s: Spec, store: Any, cfg: dict[str, Any],
               trace: dict[str, list[frozenset[int]]] | None) -> dict[str, Any]:
    """One offloaded configuration: fresh caches, the store's page cache dropped, prefill, decode."""
    from moesaic.inference.offload import OffloadConfig, offload_experts_

    oc = OffloadConfig(cache_experts=cfg["cache"], policy=cfg["policy"], prefetch=cfg["prefetch"],
                       zero_copy=cfg.get("slots", "map") == "map")
    h = offload_experts_(model, store, oc, trace=trace, device="cpu")
    store.drop_page_cache()
    try:
        out = decode(model, s, after_prefill=lambda: h.summary()["total"])
    finally:
        h.close()
    out["telemetry"] = _minus(h.summary()["total"], out.pop("snap"))
    out.update(rss_anon_kib=status_kib("RssAnon"), rss_file_kib=status_kib("RssFile"),
               cache_bytes=h.cache_bytes(), mapped_bytes=store.mapped_bytes(),
               huge_mapped_bytes=store.mapped_bytes("FilePmdMapped"), store_bytes=store.nbytes(),
               page_cache_bytes=store.page_cache_bytes())
    return out


def work(s: Spec, configs: list[dict[str, Any]]) -> None:
    """``setup``: write the store. ``sweep``: every configuration in this process (the experts are put back
    between them; their uninitialised pages cost nothing), printing one JSON line each; the routing trace
    for the oracle is recorded on the first configuration (offloading never changes routing); last the
    resident model, its experts read from the store. ``paired``: see :func:`_paired`."""
    from moesaic.inference.offload import DiskStore, expert_modules, record_expert_trace, save_expert_store
    from moesaic.inference.offload.transform import moe_layers

    torch.set_num_threads(s.threads)
    root = Path(s.dir)
    model = build(s)
    if s.task == "setup":
        fill_experts(model)
        mods = expert_modules(model)
        save_expert_store(mods, root / "store")
        print(json.dumps({"expert_bytes": sum(getattr(m, n).numel() * 4 for m in mods.values()
                                              for n in m.stacked_names())}))
        return
    layers = dict(moe_layers(model))
    orig = {n: m.experts for n, m in layers.items()}
    store = DiskStore(root / "store", verify="none")
    if s.task == "paired":
        _paired(model, s, store, layers, orig, configs)
        return
    trace: dict[str, list[frozenset[int]]] | None = None
    for cfg in configs:
        for n, m in layers.items():
            m.experts = orig[n]
        gc.collect()  # the previous configuration's caches go before the next ones are allocated
        if trace is None:
            out: dict[str, Any] = {}

            def first(c: dict[str, Any] = cfg, o: dict[str, Any] = out) -> None:
                o.update(_offloaded(model, s, store, c, None))

            trace = record_expert_trace(model, first)
        else:
            out = _offloaded(model, s, store, cfg, trace)
        gc.collect()
        print(json.dumps({**cfg, **out, "load_average": os.getloadavg()[0]}), flush=True)
    _load_resident(store, layers, orig)
    print(json.dumps({"policy": "resident", **_resident(model, s), "load_average": os.getloadavg()[0]}), flush=True)


def _load_resident(store: Any, layers: dict[str, Any], orig: dict[str, Any]) -> None:
    """Put the stacked experts back into the model and read their weights from the store."""
    for n, m in layers.items():
        m.experts = orig[n]
        ex = orig[n]
        for e in range(ex.num_experts):
            store.read_into(n, e, {k: getattr(ex, k).data[e] for k in ex.stacked_names()})


def _resident(model: torch.nn.Module, s: Spec) -> dict[str, Any]:
    res = decode(model, s)
    res.pop("snap")
    res.update(rss_anon_kib=status_kib("RssAnon"), rss_file_kib=status_kib("RssFile"))
    return res


def _paired(model: torch.nn.Module, s: Spec, store: Any, layers: dict[str, Any], orig: dict[str, Any],
            configs: list[dict[str, Any]]) -> None:
    """``paired``: the resident model and every configuration interleaved in one process, ``s.rounds`` times
    (resident, then each configuration with fresh caches and the page cache dropped), one JSON line per run
    with its round: each configuration's ratio is taken to the resident run of its own round, so a host
    whose speed drifts during the sweep moves both sides of a ratio alike."""
    from moesaic.inference.offload import record_expert_trace

    _load_resident(store, layers, orig)
    resident_experts = {n: m.experts for n, m in layers.items()}
    trace = None
    if any(c["policy"] == "oracle" for c in configs):  # an untimed resident run records the oracle's future
        trace = record_expert_trace(model, lambda: decode(model, s))
    for rnd in range(s.rounds):
        for n, m in layers.items():
            m.experts = resident_experts[n]
        print(json.dumps({"policy": "resident", "round": rnd, **_resident(model, s),
                          "load_average": os.getloadavg()[0]}), flush=True)
        for cfg in configs:
            for n, m in layers.items():
                m.experts = resident_experts[n]
            gc.collect()
            out = _offloaded(model, s, store, cfg, trace)
            print(json.dumps({**cfg, **out, "round": rnd, "load_average": os.getloadavg()[0]}), flush=True)
