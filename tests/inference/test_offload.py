"""Offloaded experts (docs/inference.md, "Offloaded experts"): decoding through an expert cache in front of a
store gives the resident model's tokens and logits bit for bit, for every tier, policy, cache size, prefetch
mode and experts backend; the cache's telemetry adds up; the oracle policy is Belady-optimal on single
accesses (checked against an exhaustive search) and LRU matches a reference simulation."""

import itertools
import random

import pytest
import torch

import moesaic
from moesaic.inference.offload import (
    DiskStore,
    ExpertCache,
    MemoryStore,
    OffloadConfig,
    expert_modules,
    memory_store,
    offload_experts_,
    record_expert_trace,
    save_expert_store,
)
from moesaic.inference.offload.policies import build_policy
from offload_fixtures import decode, demo_lm


@pytest.fixture(scope="module")
def resident():
    m = demo_lm()
    return decode(m), record_expert_trace(m, lambda: decode(m))


def store_for(model, tier: str, tmp_path):
    if tier == "disk":
        return DiskStore(save_expert_store(expert_modules(model), tmp_path / "store"))
    return memory_store(model, tier)


@pytest.mark.parametrize("tier", ["device", "cpu", "disk"])
@pytest.mark.parametrize("policy", ["lru", "lfu", "lfru", "oracle"])
def test_offloaded_decoding_is_bit_identical(tier, policy, resident, tmp_path):
    (want_tokens, want_logits), trace = resident
    for cap, prefetch in [*itertools.product([2, 5], ["none", "pregate", "prev"]), (8, "none")]:
        m = demo_lm()
        store = store_for(m, tier, tmp_path / f"{cap}{prefetch}")
        h = offload_experts_(m, store, OffloadConfig(cache_experts=cap, policy=policy, prefetch=prefetch), trace=trace)
        try:
            tokens, logits = decode(m)
        finally:
            h.close()
            store.close()
        assert tokens == want_tokens, (cap, prefetch)
        assert torch.equal(logits, want_logits), (cap, prefetch)
        t = h.summary()["total"]
        assert t["hits"] + t["misses"] == t["accesses"] > 0
        spec = store.spec("model.layers.0.mlp")
        assert t["bytes_read"] == t["loads"] * spec.expert_nbytes
        if cap == 8 and prefetch == "none":  # everything fits: only compulsory misses (each used expert once)
            assert t["misses"] == sum(len(set().union(*trace[n])) for n in trace)
        if prefetch == "pregate" and cap < 8:
            # hints are always given; whether the worker thread loads one before its forward starts depends on
            # scheduling (on a loaded machine the compute thread can win every race), so loads may be 0
            assert t["hinted"] > 0 and t["prefetch_loads"] >= 0 and 0 <= t["prefetch_accuracy"] <= 1


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "bmm", "active", "fused"])
def test_every_experts_backend_is_reproduced(backend, tmp_path):
    want = decode(demo_lm(backend=backend))
    m = demo_lm(backend=backend)
    h = offload_experts_(m, memory_store(m), OffloadConfig(cache_experts=3, prefetch="pregate"))
    got = decode(m)
    h.close()
    assert got[0] == want[0] and torch.equal(got[1], want[1])


def test_generate_and_telemetry_per_layer(tmp_path):
    m0 = demo_lm(4)
    ids = torch.tensor([[5, 9, 2, 7, 1, 3, 3, 8]])
    want = moesaic.generate(m0, ids, 8)
    m = demo_lm(4)
    h = offload_experts_(m, DiskStore(save_expert_store(expert_modules(m), tmp_path / "s")), 2)
    assert torch.equal(moesaic.generate(m, ids, 8), want)
    tel = h.telemetry()
    assert list(tel) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(t.forwards == 8 and t.accesses >= 2 * 7 for t in tel.values())  # prefill + 7 decode steps
    assert not any(n.endswith("w_up_EHD") for n, _ in m.named_parameters())  # the weights left the model


def _tiny_store(E: int) -> MemoryStore:
    return MemoryStore({"L": {"w": torch.arange(E, dtype=torch.float32)[:, None].repeat(1, 4)}})


def _misses(cache: ExpertCache, seq: list[int]) -> int:
    for e in seq:
        cache.begin_forward([e])
        cache.acquire([e])
        cache.release([e])
    return cache.telemetry.misses


def _belady_brute(seq: list[int], cap: int) -> int:
    """Fewest misses of any eviction choice (exhaustive search over cache states)."""
    best = {frozenset(): 0}
    for e in seq:
        nxt: dict[frozenset, int] = {}
        for state, m in best.items():
            if e in state:
                outs = [state]
            elif len(state) < cap:
                outs, m = [state | {e}], m + 1
            else:
                outs, m = [(state - {v}) | {e} for v in state], m + 1
            for s in outs:
                nxt[s] = min(nxt.get(s, 1 << 30), m)
        best = nxt
    return min(best.values())


def _lru_reference(seq: list[int], cap: int) -> int:
    order: list[int] = []
    misses = 0
    for e in seq:
        if e in order:
            order.remove(e)
        else:
            misses += 1
            if len(order) == cap:
                order.pop(0)
        order.append(e)
    return misses


@pytest.mark.parametrize("seed", range(6))
def test_oracle_is_belady_optimal_and_lru_matches_reference(seed):
    rng = random.Random(seed)
    E, cap = 6, rng.choice([2, 3])
    seq = [min(int(rng.expovariate(0.5)), E - 1) for _ in range(14)]  # skewed, like expert popularity
    store = _tiny_store(E)
    trace = [frozenset([e]) for e in seq]
    oracle = ExpertCache(store, "L", cap, build_policy("oracle", E, trace))
    assert _misses(oracle, seq) == _belady_brute(seq, cap)
    lru = ExpertCache(store, "L", cap, build_policy("lru", E))
    assert _misses(lru, seq) == _lru_reference(seq, cap)
    for name in ("lfu", "lfru"):  # never better than the optimum
        assert _misses(ExpertCache(store, "L", cap, build_policy(name, E)), seq) >= _belady_brute(seq, cap)
    w = ExpertCache(store, "L", cap, build_policy("lru", E))
    (slot,) = w.acquire([seq[0]])
    assert torch.equal(w.buffers["w"][slot], torch.full((4,), float(seq[0])))  # the slot holds that expert


def test_route_by_pregate_changes_routing_exact_hints_and_restores():
    from moesaic.inference.offload.pregate_route import route_by_pregate_

    m = demo_lm()
    base = decode(m)
    h = route_by_pregate_(m)
    routed = decode(m)
    h.restore()
    again = decode(m)
    assert again[0] == base[0] and torch.equal(again[1], base[1])  # restore is exact
    assert not torch.equal(routed[1], base[1])  # layer 1 is routed on layer 0's input: outputs change
    m2 = demo_lm()
    route_by_pregate_(m2)
    o = offload_experts_(m2, memory_store(m2), OffloadConfig(cache_experts=3, prefetch="pregate"))
    got = decode(m2)
    o.close()
    assert got[0] == routed[0] and torch.equal(got[1], routed[1])
    assert o.summary()["total"]["hint_precision"] == 1.0  # the hint is the routing


def test_pregate_hint_of_one_token_is_the_next_routers_choice():
    """A decode token's pre-gate hint (the lean path: the router's selection alone) names the experts the next
    layer's router forward picks on the same input, as the general path does for several tokens."""
    from moesaic.inference.offload.prefetch import Prefetcher

    m = demo_lm()
    h = offload_experts_(m, memory_store(m, "cpu"), OffloadConfig(cache_experts=4, prefetch="pregate"))
    try:
        pf = next(ex.prefetcher for ex in h.layers.values())
        assert isinstance(pf, Prefetcher)
        layer0, layer1 = (b.mlp for b in m.model.layers)
        g = torch.Generator().manual_seed(0)
        for _ in range(20):
            x_TD = torch.randn(1, layer0.d_model, generator=g)
            with torch.no_grad():
                plan = layer0.dispatcher.plan(layer0.router(x_TD))
                want = set(layer1.router(x_TD).expert_idx_N.tolist())
                two = torch.cat([x_TD, torch.randn(1, layer0.d_model, generator=g)])
                plan2 = layer0.dispatcher.plan(layer0.router(two))
                want2 = set(layer1.router(two).expert_idx_N.tolist())
            assert pf.hint(0, x_TD, plan) == (1, want)
            assert pf.hint(0, two, plan2) == (1, want2)  # the general path
    finally:
        h.close()
