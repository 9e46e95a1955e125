"""The per-layer expert cache: N slots of expert weights, an eviction policy, and telemetry.

``ExpertCache(store, layer, capacity, policy)`` allocates ``capacity`` slots per stacked tensor
(``w_up_SHD`` ``[S, H, D]``, ``w_down_SDF`` ``[S, D, F]``, S = capacity) once, on the compute device, and
maps experts to slots. The compute thread calls :meth:`ExpertCache.acquire` with the experts a forward
needs (at most ``capacity`` at once): hits are pinned, misses evict the policy's victim (never a pinned
expert, never one being loaded) and are read from the store synchronously; :meth:`ExpertCache.release`
unpins. A prefetch thread calls :meth:`ExpertCache.prefetch` to load an expert ahead of need into a slot
whose expert is neither pinned nor hinted; the compute thread waits for an expert whose prefetch is in
flight instead of loading it twice. Every state change happens under one condition variable; the copies
themselves run outside it, so loading overlaps computing (Pre-gated MoE: Hwang et al. 2024; M2R2 and
MoE-Infinity's prefetching).

Telemetry (:class:`LayerTelemetry`): accesses, hits, misses, loads and bytes read, prefetch loads and how
many of them a forward used (prefetch accuracy), how many hinted experts the next forward needed (hint
precision), and the time the compute thread waited for loads.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import torch
from torch import Tensor

from moesaic.core.errors import ConfigError
from moesaic.inference.offload.mapped import MappedSlots
from moesaic.inference.offload.policies import CachePolicy
from moesaic.inference.offload.store import ExpertStore


@dataclasses.dataclass
class LayerTelemetry:
    """Counters of one layer's cache (see the module docstring)."""

    forwards: int = 0
    accesses: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    bytes_read: int = 0
    prefetch_loads: int = 0
    prefetch_used: int = 0
    hinted: int = 0
    hinted_needed: int = 0
    wait_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        """Prefetched experts a forward then needed, over prefetch loads (0 without prefetch)."""
        return self.prefetch_used / self.prefetch_loads if self.prefetch_loads else 0.0

    @property
    def hint_precision(self) -> float:
        """Hinted experts the hinted forward needed, over hinted experts (the predictor's accuracy)."""
        return self.hinted_needed / self.hinted if self.hinted else 0.0

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dataclasses.asdict(self)
        d.update(hit_rate=self.hit_rate, prefetch_accuracy=self.prefetch_accuracy,
                 hint_precision=self.hint_precision)
        return d


def total(telemetry: list[LayerTelemetry]) -> LayerTelemetry:
    """The sum of several layers' counters."""
    out = LayerTelemetry()
    for t in telemetry:
        for f in dataclasses.fields(out):
            setattr(out, f.name, getattr(out, f.name) + getattr(t, f.name))
    return out


class ExpertCache:
    """``capacity`` expert slots of one layer in front of a store (see the module docstring)."""

    def __init__(self, store: ExpertStore, layer: str, capacity: int, policy: CachePolicy,
                 device: torch.device | str = "cpu", zero_copy: bool = True):
        spec = store.spec(layer)
        if capacity < 1:
            raise ConfigError(f"{layer}.cache_experts", capacity, "must be >= 1")
        self.store, self.layer, self.policy = store, layer, policy
        self.num_experts = spec.num_experts
        self.capacity = min(capacity, spec.num_experts)
        self.slots = store.new_slots(layer, self.capacity, device, zero_copy)
        #: whether the slots map the store's file pages (zero copy) instead of holding copies
        self.mapped = isinstance(self.slots, MappedSlots)
        self.buffers: dict[str, Tensor] = self.slots.buffers if isinstance(self.slots, MappedSlots) else self.slots
        self.slot_of: dict[int, int] = {}
        self.expert_at: list[int | None] = [None] * self.capacity
        self.loading: set[int] = set()
        self.pins: dict[int, int] = {}
        self.unused_prefetch: set[int] = set()
        self.hint: set[int] = set()
        self.cond = threading.Condition()
        self.telemetry = LayerTelemetry()

    # ------------------------------------------------------------------ compute thread

    def begin_forward(self, needed: list[int]) -> None:
        """A forward of the layer starts and needs ``needed``: advance the policy, score the last hint."""
        with self.cond:
            self.policy.on_step()
            t = self.telemetry
            t.forwards += 1
            if self.hint:
                t.hinted += len(self.hint)
                t.hinted_needed += len(self.hint & set(needed))
                self.hint = set()

    def acquire(self, experts: list[int]) -> list[int]:
        """Pin ``experts`` (at most ``capacity``), load the ones not cached; their slots, in the same order."""
        if len(experts) > self.capacity:
            raise ConfigError(f"{self.layer}.cache_experts", self.capacity,
                              f"a chunk of {len(experts)} experts does not fit")
        t0 = time.perf_counter()
        t, mine = self.telemetry, []
        with self.cond:
            for e in experts:
                self.pins[e] = self.pins.get(e, 0) + 1
            for e in experts:
                t.accesses += 1
                self.policy.on_access(e)
                if e in self.slot_of:
                    t.hits += 1
                    if e in self.unused_prefetch:
                        self.unused_prefetch.discard(e)
                        t.prefetch_used += 1
                else:
                    t.misses += 1
                    self._assign(e, self._slot_for_miss())
                    self.policy.on_insert(e, prefetch=False)
                    mine.append(e)
        try:
            for e in mine:
                self._load(e, prefetch=False)
            with self.cond:
                while any(e in self.loading for e in experts):  # prefetches in flight
                    self.cond.wait()
                missing = [e for e in experts if e not in self.slot_of]  # a failed prefetch: load it here
                for e in missing:
                    self._assign(e, self._slot_for_miss())
                    mine.append(e)
            for e in missing:
                self._load(e, prefetch=False)
        except BaseException:
            with self.cond:
                for e in mine:
                    if e in self.loading and e in self.slot_of:
                        self.loading.discard(e)
                        self._drop(e)
            self.release(experts)
            raise
        t.wait_s += time.perf_counter() - t0
        return [self.slot_of[e] for e in experts]

    def release(self, experts: list[int]) -> None:
        """Unpin experts acquired before."""
        with self.cond:
            for e in experts:
                self.pins[e] -= 1
                if not self.pins[e]:
                    del self.pins[e]
            self.cond.notify_all()

    def set_hint(self, experts: set[int]) -> None:
        """The experts predicted for the layer's next forward (kept from eviction by prefetches, scored)."""
        with self.cond:
            self.hint = set(experts)

    # ------------------------------------------------------------------ prefetch thread

    def prefetch(self, e: int, forwards: int) -> bool:
        """Load expert e ahead of need unless cached, loading, or the hinted forward (``forwards`` = the count
        of forwards when hinted) has started. Never evicts a pinned or hinted expert. Whether it loaded."""
        with self.cond:
            if e in self.slot_of or self.telemetry.forwards != forwards:
                return False
            slot = self._free_slot(wait=False)
            if slot is None:
                return False
            self._assign(e, slot)
            self.unused_prefetch.add(e)
            self.policy.on_insert(e, prefetch=True)
        try:
            self._load(e, prefetch=True)
        except Exception:  # noqa: BLE001 - the compute thread loads it itself and raises the typed error
            return False
        return True

    # ------------------------------------------------------------------ internals (cond held where noted)

    def _assign(self, e: int, slot: int) -> None:  # cond held
        self.slot_of[e] = slot
        self.expert_at[slot] = e
        self.loading.add(e)

    def _drop(self, e: int) -> int:  # cond held
        slot = self.slot_of.pop(e)
        self.expert_at[slot] = None
        self.unused_prefetch.discard(e)
        self.policy.on_evict(e)
        return slot

    def _slot_for_miss(self) -> int:  # cond held
        slot = self._free_slot(wait=True)
        assert slot is not None
        return slot

    def _free_slot(self, wait: bool) -> int | None:  # cond held
        while True:
            for s, e in enumerate(self.expert_at):
                if e is None:
                    return s
            cands = [e for e in self.slot_of if e not in self.pins and e not in self.loading
                     and (wait or e not in self.hint)]
            if cands:
                return self._drop(self.policy.victim(cands))
            if not wait:
                return None
            if not self.loading:  # every slot pinned by this forward: acquire() checked the size, so a bug
                raise RuntimeError(f"{self.layer}: no evictable expert slot")
            self.cond.wait()

    def _load(self, e: int, prefetch: bool) -> None:
        """Read expert e into its slot (outside the lock); on failure the slot is freed and the error raised."""
        slot = self.slot_of[e]
        try:
            n = self.store.load_slot(self.layer, e, self.slots, slot, ahead=prefetch)
        except BaseException:
            with self.cond:
                self.loading.discard(e)
                if self.slot_of.get(e) == slot:
                    self._drop(e)
                self.cond.notify_all()
            raise
        with self.cond:
            self.loading.discard(e)
            t = self.telemetry
            t.loads += 1
            t.bytes_read += n
            t.prefetch_loads += int(prefetch)
            self.cond.notify_all()

    def resident_bytes(self) -> int:
        """Bytes of the slot buffers held in the process's own memory; 0 for mapped slots, whose pages are the
        store file's (:meth:`moesaic.inference.offload.disk.DiskStore.mapped_bytes` counts those)."""
        if self.mapped:
            return 0
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
