"""``GET /metrics`` of ``moesaic serve``: Prometheus text exposition (prometheus_client, one registry per
server so that several servers can live in one process).

Requests by endpoint and status, prompt and completion tokens, end-to-end latency and time to first token
histograms, running and waiting requests, cancellations by reason, rows per decode step, and the MoE
telemetry: tokens routed to each expert of each MoE layer (``moesaic_expert_tokens_total{layer,expert}``,
read through the layer's public routing hook, ``MoELayer.register_routing_hook``; docs/design.md).

Expert caches: offloaded experts are not part of moesaic yet, so there are no cache hits or misses to
export; :class:`ServeMetrics` exports ``moesaic_expert_cache_hits_total``/``misses_total`` for every module
that reports ``cache_stats() -> {"hits": int, "misses": int}`` and nothing otherwise (docs/serve.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from torch import nn

from moesaic.core.types import DispatchPlan, RoutingDecision
from moesaic.moe.layer import MoELayer

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _ExpertCollector(Collector):
    """Per-layer expert load and expert-cache counters, read when Prometheus scrapes."""

    def __init__(self, model: nn.Module):
        self.layers = [(name or "moe", m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
        self.counts: dict[str, list[int]] = {n: [0] * m.num_experts for n, m in self.layers}
        self.caches = [(name or "model", m) for name, m in model.named_modules() if callable(getattr(m, "cache_stats",
                                                                                                    None))]
        self.handles = [m.register_routing_hook(self._hook(n)) for n, m in self.layers]

    def _hook(self, name: str) -> Any:
        def hook(layer: MoELayer, decision: RoutingDecision, plan: DispatchPlan) -> None:
            if plan.counts_E.numel() == len(self.counts[name]):
                for e, c in enumerate(plan.counts_E.tolist()):
                    self.counts[name][e] += int(c)
        return hook

    def collect(self) -> Iterator[CounterMetricFamily]:
        load = CounterMetricFamily("moesaic_expert_tokens", "tokens routed to each expert of each MoE layer "
                                   "(prompt and generated tokens; assignments, so a token counts k times)",
                                   labels=["layer", "expert"])
        for name, counts in self.counts.items():
            for e, c in enumerate(counts):
                load.add_metric([name, str(e)], c)
        yield load
        if self.caches:
            hits = CounterMetricFamily("moesaic_expert_cache_hits", "expert cache hits", labels=["module"])
            misses = CounterMetricFamily("moesaic_expert_cache_misses", "expert cache misses", labels=["module"])
            for name, m in self.caches:
                st = m.cache_stats()
                hits.add_metric([name], st.get("hits", 0))
                misses.add_metric([name], st.get("misses", 0))
            yield hits
            yield misses

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class ServeMetrics:
    """The server's counters; :meth:`render` is the body of ``GET /metrics``."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, model: nn.Module):
        disable_created_metrics()  # no `*_created` timestamp series (process-wide in prometheus_client)
        r = self.registry = CollectorRegistry()
        self.requests = Counter("moesaic_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("moesaic_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("moesaic_completion_tokens", "generated tokens", registry=r)
        self.latency = Histogram("moesaic_request_latency_seconds", "time from request to its last token",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("moesaic_time_to_first_token_seconds", "time from request to its first text",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.cancelled = Counter("moesaic_requests_cancelled", "generations ended early, by reason "
                                 "(disconnect, timeout, shutdown, error)", ["reason"], registry=r)
        self.rejected = Counter("moesaic_requests_rejected", "requests refused because the queue was full (429)",
                                registry=r)
        self.step_rows = Histogram("moesaic_decode_step_rows", "sequences decoded together per step",
                                   buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.running = Gauge("moesaic_requests_running", "sequences being decoded", registry=r)
        self.waiting = Gauge("moesaic_requests_waiting", "requests waiting for a row", registry=r)
        self.experts = _ExpertCollector(model)
        r.register(self.experts)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def close(self) -> None:
        self.experts.remove()
