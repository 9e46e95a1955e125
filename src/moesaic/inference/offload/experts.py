"""Offloaded experts: the experts interface (docs/design.md, "Experts interface") over an expert cache.

:class:`OffloadedExperts` replaces a layer's stacked FFN experts. Its forward takes the same
``(x_TD, plan)`` and computes the same function, bit for bit, with the weights of the needed experts
taken from cache slots instead of the stacked parameters:

* the backend is resolved exactly as the wrapped experts resolve it (``auto``: ``active`` at decode,
  ``fused`` otherwise, from the plan's row count and E), so the same kernels run;
* the needed experts (those with rows, in expert order) are taken in chunks of at most ``capacity``; each
  chunk is acquired from the cache (hits pinned, misses loaded) and computed on the slot buffers
  ``w_up_SHD``/``w_down_SDF``, with every expert keeping its rows (same row counts per matmul);
* backends that compute grouped rows (``active``, ``loop``, ``grouped_mm``, ``bmm``): the chunk's rows
  are reordered into slot order, computed, put back in expert order, and one ``plan.combine`` scatters
  all rows, so every token sums its experts in the resident order (``bmm`` pads every slot to the plan's
  largest row count, as the resident experts are padded: a matmul's result depends on its row count);
* ``fused`` (weighted scatter inside the kernel): one call per expert, summed in expert order, which is the
  order its scatter-add accumulates in.

The wrapper is inference-only: it has no parameters, and ``load_expert_state`` is refused (the store is
read-only). Soft MoE plans (every expert on slot mixes) need a cache holding all experts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moesaic.core.errors import ConfigError
from moesaic.core.types import DispatchPlan
from moesaic.inference.offload.cache import ExpertCache
from moesaic.moe.experts.backends import BACKENDS, resolve_backend
from moesaic.moe.experts.backends.bmm import BmmBackend
from moesaic.moe.experts.base import Experts, ExpertsConfig
from moesaic.moe.experts.grouped_glu import grouped_glu
from moesaic.moe.experts.kernels import StackedFFN

if TYPE_CHECKING:
    from moesaic.inference.offload.prefetch import Prefetcher


class OffloadedExperts(Experts):
    """Stacked FFN experts whose weights live in a store, computed from a per-layer cache of slots."""

    def __init__(self, cfg: ExpertsConfig, d_model: int, d_ff: int, num_experts: int, cache: ExpertCache,
                 activation: str, gated: bool, backend: str, index: int):
        super().__init__(cfg, d_model, d_ff, num_experts)
        self.cache, self.activation, self.gated, self.backend, self.index = cache, activation, gated, backend, index
        self.prefetcher: Prefetcher | None = None
        self.last_needed: list[int] = []

    def stacked_names(self) -> list[str]:
        return list(self.cache.buffers)

    def expert_state(self, e: int) -> dict[str, Tensor]:
        """Expert e's tensors, read from the store into new tensors (the cache is not touched)."""
        out = {n: torch.empty(b.shape[1:], dtype=b.dtype, device=b.device) for n, b in self.cache.buffers.items()}
        self.cache.store.read_into(self.cache.layer, e, out)
        return out

    def load_expert_state(self, e: int, state: dict[str, Tensor]) -> None:
        raise ConfigError(f"{self.cache.layer}.experts", "offloaded", "the expert store is read-only; change the "
                                                                       "weights before offload_experts_")

    def _ffn(self) -> StackedFFN:
        return StackedFFN(self.cache.buffers["w_up_EHD"], self.cache.buffers["w_down_EDF"], self.activation,
                          self.gated)

    def forward(self, x_TD: Tensor, plan: DispatchPlan, backend: str | None = None) -> Tensor:
        """``y_TD`` for the plan, equal bit for bit to the resident experts' (module docstring)."""
        E, cap = self.num_experts, self.cache.capacity
        name = resolve_backend(backend or self.backend, plan.num_rows, E)
        counts = plan.counts_E.tolist()
        needed = [e for e, c in enumerate(counts) if c]
        self.cache.begin_forward(needed)
        if self.prefetcher is not None:
            self.prefetcher.on_route(self.index, x_TD, plan, needed)
        self.last_needed = needed
        if plan.slots is not None and cap < E:
            raise ConfigError(f"{self.cache.layer}.cache_experts", cap,
                              f"a Soft MoE layer computes every expert at once; cache all {E}")
        chunks = [needed[i:i + cap] for i in range(0, len(needed), cap)]
        if name == "fused" and plan.slots is None:
            return self._fused(x_TD, plan, chunks, counts)
        return self._rows(x_TD, plan, chunks, counts, name)

    def _rows(self, x_TD: Tensor, plan: DispatchPlan, chunks: list[list[int]], counts: list[int],
              name: str) -> Tensor:
        """Grouped-rows backends: compute each chunk's rows on the slots, then one weighted combine."""
        x_ND = plan.gather(x_TD)
        start = [0]
        for c in counts:
            start.append(start[-1] + c)
        y_parts: dict[int, Tensor] = {}
        ffn, be = self._ffn(), BACKENDS.get(name)
        for chunk in chunks:
            slots = self.cache.acquire(chunk)
            try:
                order = sorted(range(len(chunk)), key=lambda i: slots[i])
                counts_S = [0] * self.cache.capacity
                for i in order:
                    counts_S[slots[i]] = counts[chunk[i]]
                x_nD = torch.cat([x_ND[start[chunk[i]]:start[chunk[i] + 1]] for i in order])
                counts_S_t = torch.tensor(counts_S, device=plan.counts_E.device)
                y_nD = (BmmBackend.padded_rows(x_nD, counts_S_t, ffn, max(counts)) if name == "bmm"
                        else be.rows(x_nD, counts_S_t, ffn))
            finally:
                self.cache.release(chunk)
            pos = 0
            for i in order:
                n = counts[chunk[i]]
                y_parts[chunk[i]] = y_nD[pos:pos + n]
                pos += n
        if not y_parts:
            return plan.combine(x_ND.new_zeros(0, self.d_model))
        return plan.combine(torch.cat([y_parts[e] for e in sorted(y_parts)]))

    def _fused(self, x_TD: Tensor, plan: DispatchPlan, chunks: list[list[int]], counts: list[int]) -> Tensor:
        """``fused``: one weighted-scatter call per expert on its slot, summed in expert order."""
        start = [0]
        for c in counts:
            start.append(start[-1] + c)
        y_TD: Tensor | None = None
        for chunk in chunks:
            slots = self.cache.acquire(chunk)
            try:
                for e, s in zip(chunk, slots, strict=True):
                    ffn = StackedFFN(self.cache.buffers["w_up_EHD"][s:s + 1],
                                     self.cache.buffers["w_down_EDF"][s:s + 1], self.activation, self.gated)
                    a, b = start[e], start[e + 1]
                    y_e = grouped_glu(x_TD, ffn, plan.counts_E[e:e + 1], rows_N=plan.token_idx_N[a:b],
                                      weight_N=plan.weight_N[a:b], num_out=plan.num_tokens)
                    y_TD = y_e if y_TD is None else y_TD + y_e
            finally:
                self.cache.release(chunk)
        if y_TD is None:
            return x_TD.new_zeros(plan.num_tokens, self.d_model)
        return y_TD

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, layer={self.cache.layer}, cache={self.cache.capacity}, "
                f"policy={type(self.cache.policy).__name__}, tier={self.cache.store.tier}")
