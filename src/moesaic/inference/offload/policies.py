"""Eviction policies of the per-layer expert cache, registered in :data:`CACHE_POLICIES` (docs/inference.md,
"Offloaded experts").

A policy only decides *which* cached expert to drop; the cache (:mod:`moesaic.inference.offload.cache`)
owns the slots, the locking and the telemetry. The cache tells the policy about every access
(:meth:`CachePolicy.on_access`, once per expert a forward needs, in the order it needs them), every load
(:meth:`CachePolicy.on_insert`, a miss or a prefetch), every eviction (:meth:`CachePolicy.on_evict`) and
the start of each forward of its layer (:meth:`CachePolicy.on_step`); :meth:`CachePolicy.victim` picks
one of the ``candidates`` (cached, not needed by the running forward).

* ``lru``: least recently used (mixtral-offloading's expert cache: Eliseev & Mazur 2023).
* ``lfu``: least frequently used over the whole run, ties broken by recency (MoE-Infinity's activation-aware
  cache keeps frequently activated experts: Xue et al. 2024).
* ``lfru``: frequency with recency decay: each access adds 1 to an expert's score and every forward of the
  layer multiplies all scores by ``decay``, so a burst of recent use outweighs old popularity; the
  lowest score goes (ties: LRU). A decayed-frequency reading of LFRU (Bilal & Kang 2017, "A Cache
  Management Scheme for Efficient Content Eviction and Replication in Cache Networks"), the policy vLLM's
  expert-offloading proposal names.
* ``oracle``: Belady's MIN (Belady 1966): evict the expert whose next use lies farthest in the future of a
  known routing trace (one set of experts per forward of the layer, recorded from a run on the same
  prompts); the hit-rate upper bound of any policy at this cache size (EdgeMoE and MoE-Infinity report
  against it too).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from moesaic.core.errors import ConfigError
from moesaic.core.registry import Registry

CACHE_POLICIES: Registry[type[CachePolicy]] = Registry(
    "cache policy", "moesaic.inference.offload.policies", base="moesaic.inference.offload.policies:CachePolicy",
    default="lru")


class CachePolicy:
    """Base class: recency bookkeeping shared by all policies; subclasses override :meth:`victim`."""

    def __init__(self, num_experts: int, trace: Sequence[frozenset[int]] | None = None, decay: float = 0.9):
        self.num_experts, self.decay = num_experts, decay
        self.clock = 0  # accesses and inserts so far (recency stamp)
        self.step = -1  # forwards of the layer so far (index into the trace)
        self.last_use: dict[int, int] = {}
        self.count: dict[int, float] = {}

    def on_step(self) -> None:
        """A forward of the layer starts."""
        self.step += 1

    def on_access(self, e: int) -> None:
        """The running forward needs expert e (hit or miss)."""
        self.clock += 1
        self.last_use[e] = self.clock
        self.count[e] = self.count.get(e, 0.0) + 1.0

    def on_insert(self, e: int, prefetch: bool) -> None:
        """Expert e was loaded into the cache (on a miss, or ahead of need when ``prefetch``)."""
        self.clock += 1
        if prefetch:  # loaded ahead of need: as recent as a use (a miss was stamped by on_access)
            self.last_use[e] = self.clock

    def on_evict(self, e: int) -> None:
        """Expert e left the cache."""

    def victim(self, candidates: Sequence[int]) -> int:
        """The expert to evict among ``candidates`` (non-empty, cached, not needed now)."""
        raise NotImplementedError  # abstract: every registered policy implements it

    def _recency(self, e: int) -> int:
        return self.last_use.get(e, 0)


@CACHE_POLICIES.register("lru")
class LRUPolicy(CachePolicy):
    """Least recently used expert goes (mixtral-offloading; Eliseev & Mazur 2023)."""

    def victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=self._recency)


@CACHE_POLICIES.register("lfu")
class LFUPolicy(CachePolicy):
    """Least frequently used expert over the run goes, ties by recency (MoE-Infinity: Xue et al. 2024)."""

    def victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=lambda e: (self.count.get(e, 0.0), self._recency(e)))


@CACHE_POLICIES.register("lfru")
class LFRUPolicy(CachePolicy):
    """Frequency with per-forward recency decay (LFRU: Bilal & Kang 2017; vLLM's expert-cache proposal)."""

    def on_step(self) -> None:
        super().on_step()
        for e in self.count:
            self.count[e] *= self.decay

    def victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=lambda e: (self.count.get(e, 0.0), self._recency(e)))


@CACHE_POLICIES.register("oracle")
class OraclePolicy(CachePolicy):
    """Belady's MIN on a known routing trace: evict the expert needed farthest in the future (upper bound)."""

    def __init__(self, num_experts: int, trace: Sequence[frozenset[int]] | None = None, decay: float = 0.9):
        super().__init__(num_experts, trace, decay)
        if trace is None:
            raise ConfigError("cache.policy", "oracle", "needs the routing trace of the run (offload_experts_(..., "
                                                        "trace=record_expert_trace(...)))")
        self.trace = list(trace)
        self.uses: dict[int, list[int]] = {}
        for i, need in enumerate(self.trace):
            for e in need:
                self.uses.setdefault(e, []).append(i)

    def next_use(self, e: int) -> int:
        """The first forward after the current one that needs e (``len(trace)`` + e when none: never again)."""
        lst = self.uses.get(e, [])
        i = bisect.bisect_right(lst, self.step)
        return lst[i] if i < len(lst) else len(self.trace) + e

    def victim(self, candidates: Sequence[int]) -> int:
        return max(candidates, key=self.next_use)


def build_policy(name: str, num_experts: int, trace: Sequence[frozenset[int]] | None = None,
                 decay: float = 0.9) -> CachePolicy:
    """The registered policy ``name`` for one layer of ``num_experts`` experts (``trace``: that layer's)."""
    cls = CACHE_POLICIES.get(name)
    return cls(num_experts, trace, decay)
