"""Offloaded experts: expert stores (RAM, device, mmap'd safetensors on disk), a per-layer cache of N experts
with pluggable eviction policies (LRU, LFU, LFRU, Belady's oracle), prefetch in a background thread
(pre-gating, previous-token choices), applied as the transform :func:`offload_experts_`. docs/inference.md,
"Offloaded experts"."""

from moesaic.inference.offload.cache import ExpertCache, LayerTelemetry
from moesaic.inference.offload.disk import DiskStore, save_expert_store
from moesaic.inference.offload.experts import OffloadedExperts
from moesaic.inference.offload.policies import CACHE_POLICIES, CachePolicy
from moesaic.inference.offload.prefetch import PREFETCH_MODES, Prefetcher
from moesaic.inference.offload.store import ExpertStore, LayerSpec, MemoryStore
from moesaic.inference.offload.transform import (
    OffloadConfig,
    OffloadHandle,
    expert_modules,
    memory_store,
    offload_experts_,
    record_expert_trace,
)

__all__ = ["CACHE_POLICIES", "PREFETCH_MODES", "CachePolicy", "DiskStore", "ExpertCache", "ExpertStore",
           "LayerSpec", "LayerTelemetry", "MemoryStore", "OffloadConfig", "OffloadHandle", "OffloadedExperts",
           "Prefetcher", "expert_modules", "memory_store", "offload_experts_", "record_expert_trace",
           "save_expert_store"]
