"""Record routing decisions of every MoE layer during forwards (docs/design.md, "The data path").

``with RoutingRecorder(model) as rec: model(x)`` stores, for each MoE layer (by module path, in model
order), every forward's assignments through the layer's public routing hook
(:meth:`moesaic.moe.layer.MoELayer.register_routing_hook`); nothing in the model is patched.
:meth:`RoutingRecorder.topk_ids` returns ``[T_total, k]`` expert ids per layer (choice order, ``-1``
where a token has fewer experts, padding rows included as all ``-1``), the input of inter-layer affinity
(ExFlow: Yao et al. 2024, "Exploiting Inter-Layer Expert Affinity for Accelerating Mixture-of-Experts
Model Inference", arXiv 2401.08383). Hooks are removed on exit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from moesaic.core.types import DispatchPlan, RoutingDecision
from moesaic.moe.layer import MoELayer


class RoutingRecorder:
    """Context manager that records every MoE layer's top-k ids and weights (on the CPU) per forward."""

    def __init__(self, model: nn.Module, top_k: int | None = None):
        self.model = model
        self.top_k = top_k
        self.layers = [(n or "moe", m) for n, m in model.named_modules() if isinstance(m, MoELayer)]
        self.records: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n, _ in self.layers}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> RoutingRecorder:
        for name, layer in self.layers:
            self._handles.append(layer.register_routing_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[[MoELayer, RoutingDecision, DispatchPlan], None]:
        def hook(layer: MoELayer, decision: RoutingDecision, plan: DispatchPlan) -> None:
            ids_TK, w_TK = decision.to_topk(self.top_k or layer.top_k)
            self.records[name].append((ids_TK.detach().cpu(), w_TK.detach().cpu()))

        return hook

    def clear(self) -> None:
        for v in self.records.values():
            v.clear()

    def topk_ids(self) -> dict[str, Tensor]:
        """Layer name -> ``[T_total, k]`` int64 expert ids of every recorded token (forwards concatenated)."""
        return {n: torch.cat([ids for ids, _ in recs]) if recs else torch.zeros(0, 0, dtype=torch.long)
                for n, recs in self.records.items()}

    def tokens_per_expert(self) -> dict[str, Tensor]:
        out = {}
        for (n, layer), ids in zip(self.layers, self.topk_ids().values()):
            flat = ids.reshape(-1)
            out[n] = torch.bincount(flat[flat >= 0], minlength=layer.num_experts)
        return out
