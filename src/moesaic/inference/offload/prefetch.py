"""Expert prefetch: a background thread loads the experts predicted for the next MoE layer while the
current layer computes. Prefetch only changes *what is in the cache*, never routing, so outputs stay
bit-identical to resident decoding.

Hints, given when layer l has routed (:meth:`Prefetcher.on_route`), for layer l+1:

* ``pregate``: layer l+1's router applied to layer l's MoE input (Hwang et al. 2024, "Pre-gated MoE: An
  Algorithm-System Co-Design for Fast and Scalable Mixture-of-Expert Inference": the next layer's gate is
  evaluated one layer early so its experts can be fetched while the current layer runs; here the trained
  router is used as the pre-gate without retraining, the "hint" reading of the paper). For the last
  layer nothing is predicted.
* ``prev``: the experts layer l+1 used for the previous token (ahead-of-time loading from the previous
  step's choices, M2R2; consecutive tokens share experts, MoE-Infinity's activation-aware prefetching
  relies on the same locality). At the last layer, layer 0's previous choices are hinted for the next step.

The hinted experts are queued as ``(cache, expert, forward count)``; the worker loads each one unless the
hinted forward has already started (then the compute thread loads what it misses itself). Hint precision
and prefetch accuracy are counted per layer (:class:`moesaic.inference.offload.cache.LayerTelemetry`).
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from moesaic.core.errors import ConfigError, MoesaicError
from moesaic.core.types import DispatchPlan
from moesaic.moe.routing.topk import TopKRouter

if TYPE_CHECKING:
    from moesaic.inference.offload.experts import OffloadedExperts

PREFETCH_MODES = ("none", "pregate", "prev")


class Prefetcher:
    """One background loader for all offloaded layers of a model (``layers`` in model order)."""

    def __init__(self, layers: list[OffloadedExperts], routers: list[nn.Module], mode: str):
        if mode not in PREFETCH_MODES or mode == "none":
            raise ConfigError("offload.prefetch", mode, "a prefetcher is pregate or prev")
        self.layers, self.routers, self.mode = layers, routers, mode
        self.queue: queue.Queue[tuple[int, int, int] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="moesaic-expert-prefetch", daemon=True)
        self.thread.start()
        for ex in layers:
            ex.prefetcher = self

    def hint(self, i: int, x_TD: Tensor, plan: DispatchPlan) -> tuple[int, set[int]] | None:
        """The layer to prefetch for and its predicted experts, after layer i routed ``x_TD``."""
        n = len(self.layers)
        if self.mode == "prev":
            j = (i + 1) % n
            return j, set(self.layers[j].last_needed)
        if i + 1 >= n:
            return None
        router = self.routers[i + 1]
        if type(router) is TopKRouter and plan.num_tokens == 1 and plan.slots is None and plan.num_rows:
            with torch.no_grad():  # a decode token: the router's selection alone (no decision, no statistics)
                return i + 1, set(router.choose(x_TD.reshape(1, -1))[2].reshape(-1).tolist())
        with torch.no_grad():
            valid_T = torch.zeros(plan.num_tokens, dtype=torch.bool, device=x_TD.device)
            valid_T[plan.token_idx_N] = True
            try:
                d = router(x_TD[valid_T] if plan.slots is None else x_TD)
            except MoesaicError:  # a router that needs routing context (hash, task): no hint
                return None
        return i + 1, set(d.expert_idx_N.tolist())

    def on_route(self, i: int, x_TD: Tensor, plan: DispatchPlan, needed: list[int]) -> None:
        """Layer i routed (called by its offloaded experts before they compute): queue the hint."""
        h = self.hint(i, x_TD, plan)
        if h is None:
            return
        j, experts = h
        cache = self.layers[j].cache
        cache.set_hint(experts)
        stamp = cache.telemetry.forwards
        for e in sorted(experts):
            self.queue.put((j, e, stamp))

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            j, e, stamp = item
            self.layers[j].cache.prefetch(e, stamp)

    def close(self) -> None:
        """Stop the worker (after the queued loads)."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        for ex in self.layers:
            ex.prefetcher = None
