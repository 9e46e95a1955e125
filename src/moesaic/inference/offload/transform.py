"""``offload_experts_(model, store, cache=...)``: swap every MoE layer's experts for offloaded ones.

A transform (docs/design.md: components are swapped, never branched on): each ``MoELayer.experts`` (stacked
FFN experts) becomes an :class:`OffloadedExperts` over a per-layer :class:`ExpertCache` of
``cache.cache_experts`` slots in front of the store, with the eviction policy ``cache.policy`` (registry
:data:`moesaic.inference.offload.policies.CACHE_POLICIES`) and optional prefetch. Routers, dispatchers,
shared experts and everything else stay as they are. Stores: :func:`memory_store` (tiers ``cpu`` and
``device``, the model's expert tensors moved out of the model) and
:class:`moesaic.inference.offload.disk.DiskStore` (``save_expert_store`` writes one).

::

    store = DiskStore(save_expert_store(expert_modules(model), "experts/"))
    h = offload_experts_(model, store, OffloadConfig(cache_experts=4, policy="lru", prefetch="pregate"))
    moesaic.generate(model, ids, 32)       # same tokens and logits as before
    h.telemetry()                          # per layer: hits, misses, bytes read, prefetch accuracy
    h.close()                              # stops the prefetch thread

The oracle policy needs the routing trace of the run: :func:`record_expert_trace` records it from a
resident (or any) run on the same inputs, and since offloading never changes routing, the trace is exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from moesaic.core.config import Section, require, rule, validate_tree
from moesaic.core.errors import ConfigError
from moesaic.core.types import DispatchPlan, RoutingDecision
from moesaic.inference.offload.cache import ExpertCache, LayerTelemetry, total
from moesaic.inference.offload.experts import OffloadedExperts
from moesaic.inference.offload.policies import CACHE_POLICIES, build_policy
from moesaic.inference.offload.prefetch import PREFETCH_MODES, Prefetcher
from moesaic.inference.offload.store import ExpertStore, MemoryStore
from moesaic.moe.experts.stacked_ffn import FFNExperts
from moesaic.moe.layer import MoELayer

Trace = dict[str, list[frozenset[int]]]


@dataclasses.dataclass
class OffloadConfig(Section):
    """The expert cache of every offloaded layer.

    ``cache_experts``: slots per layer (>= the layer's k; more than E means all E); ``policy``: a registered
    cache policy (lru, lfu, lfru, oracle); ``prefetch``: none, pregate or prev; ``lfru_decay``: LFRU's score
    decay per forward; ``zero_copy``: CPU slots of a disk store map the file's pages instead of copying them
    (:mod:`moesaic.inference.offload.mapped`; where the store's layout or the platform does not allow it, the
    slots copy)."""

    cache_experts: int = rule(2, ge=1)
    policy: str = "lru"
    prefetch: Literal["none", "pregate", "prev"] = "none"
    lfru_decay: float = rule(0.9, gt=0.0, le=1.0)
    zero_copy: bool = True

    def validate(self, path: str) -> None:
        require(self.policy in CACHE_POLICIES, f"{path}.policy", self.policy,
                f"must be one of {', '.join(CACHE_POLICIES.names())}")
        require(self.prefetch in PREFETCH_MODES, f"{path}.prefetch", self.prefetch,
                f"must be one of {', '.join(PREFETCH_MODES)}")


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """Every MoE layer of the model with its module path, in model order."""
    return [(n or "moe", m) for n, m in model.named_modules() if isinstance(m, MoELayer)]


def expert_modules(model: nn.Module) -> dict[str, FFNExperts]:
    """Module path of each MoE layer -> its stacked FFN experts; :class:`ConfigError` naming a layer whose
    experts cannot be offloaded (zero-computation experts, already offloaded, LoRA-wrapped...)."""
    out = {}
    for name, layer in moe_layers(model):
        ex = layer.experts
        if not isinstance(ex, FFNExperts) or type(ex).forward is not FFNExperts.forward:
            raise ConfigError(f"{name}.experts", type(ex).__name__, "only stacked FFN experts (glu, mlp) can be "
                                                                    "offloaded")
        out[name] = ex
    if not out:
        raise ConfigError("model", type(model).__name__, "has no MoE layer to offload")
    return out


def memory_store(model: nn.Module, tier: str = "cpu") -> MemoryStore:
    """A store of the model's expert tensors in RAM (``cpu``) or device memory (``device``); the tensors are
    the parameters' own (no copy), released from the model once ``offload_experts_`` swaps the experts."""
    tensors = {}
    for name, ex in expert_modules(model).items():
        tensors[name] = {n: getattr(ex, n).detach() for n in ex.stacked_names()}
    return MemoryStore(tensors, tier)


class OffloadHandle:
    """What :func:`offload_experts_` returns: the offloaded experts per layer, telemetry, ``close()``."""

    def __init__(self, layers: dict[str, OffloadedExperts], prefetcher: Prefetcher | None, store: ExpertStore):
        self.layers, self.prefetcher, self.store = layers, prefetcher, store

    def telemetry(self) -> dict[str, LayerTelemetry]:
        """Per-layer counters (live objects)."""
        return {n: ex.cache.telemetry for n, ex in self.layers.items()}

    def summary(self) -> dict[str, Any]:
        """The layers' counters summed, plus per-layer dicts."""
        tel = self.telemetry()
        return {"total": total(list(tel.values())).as_dict(), "layers": {n: t.as_dict() for n, t in tel.items()}}

    def reset_telemetry(self) -> None:
        for ex in self.layers.values():
            ex.cache.telemetry = LayerTelemetry()

    def cache_bytes(self) -> int:
        """Bytes of all cache slots in the process's own memory (mapped slots: 0, see ``store.mapped_bytes()``)."""
        return sum(ex.cache.resident_bytes() for ex in self.layers.values())

    def close(self) -> None:
        """Stop the prefetch thread (the caches stay usable without prefetch)."""
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None


def offload_experts_(model: nn.Module, store: ExpertStore, cache: OffloadConfig | int | None = None, *,
                     trace: Trace | None = None, device: torch.device | str | None = None) -> OffloadHandle:
    """Swap every MoE layer's experts for :class:`OffloadedExperts` over ``store`` (module docstring).

    ``cache``: an :class:`OffloadConfig` or the number of slots per layer; ``trace``: the routing trace the
    oracle policy reads (:func:`record_expert_trace`); ``device``: where the slots live (default: the
    device of the model's first parameter). Typed errors: a cache smaller than a layer's k, a store that
    does not hold a layer or holds other shapes, an unknown policy or prefetch mode.
    """
    cfg = OffloadConfig(cache_experts=cache) if isinstance(cache, int) else (cache or OffloadConfig())
    validate_tree(cfg, "offload")
    mods = expert_modules(model)
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else "cpu"
    layers = dict(moe_layers(model))
    built: dict[str, OffloadedExperts] = {}
    for i, (name, ex) in enumerate(mods.items()):
        layer, spec = layers[name], store.spec(name)
        k = layer.top_k
        if cfg.cache_experts < k:
            raise ConfigError("offload.cache_experts", cfg.cache_experts,
                              f"must be >= top_k = {k} of {name} (a token needs its k experts at once)")
        want = {n: tuple(getattr(ex, n).shape[1:]) for n in ex.stacked_names()}
        if spec.num_experts != ex.num_experts or spec.shapes != want:
            raise ConfigError(f"store.{name}", f"{spec.num_experts} experts {spec.shapes}",
                              f"does not fit the model's {ex.num_experts} experts {want}")
        if cfg.policy == "oracle" and (trace is None or name not in trace):
            raise ConfigError("offload.policy", "oracle", f"needs the routing trace of {name} "
                                                           "(record_expert_trace on the same inputs)")
        policy = build_policy(cfg.policy, ex.num_experts, trace[name] if trace is not None else None,
                              cfg.lfru_decay)
        c = ExpertCache(store, name, cfg.cache_experts, policy, device, cfg.zero_copy)
        built[name] = OffloadedExperts(ex.cfg, ex.d_model, ex.d_ff, ex.num_experts, c, ex.cfg.activation,
                                       ex.gated, ex.cfg.backend, i)
    for name, new in built.items():
        layers[name].experts = new
    pre = None
    if cfg.prefetch != "none":
        pre = Prefetcher(list(built.values()), [layers[n].router for n in built], cfg.prefetch)
    return OffloadHandle(built, pre, store)


def record_expert_trace(model: nn.Module, run: Callable[[], object]) -> Trace:
    """Call ``run()`` and record, per MoE layer, the set of experts each forward needed (the oracle's
    future), through the layers' routing hooks."""
    trace: Trace = {n: [] for n, _ in moe_layers(model)}

    def hook_for(name: str) -> Callable[[MoELayer, RoutingDecision, DispatchPlan], None]:
        def hook(layer: MoELayer, decision: RoutingDecision, plan: DispatchPlan) -> None:
            trace[name].append(frozenset(int(e) for e in plan.counts_E.nonzero().flatten().tolist()))
        return hook

    handles = [m.register_routing_hook(hook_for(n)) for n, m in moe_layers(model)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return trace


def policies() -> Sequence[str]:
    """The registered cache policy names."""
    return CACHE_POLICIES.names()
