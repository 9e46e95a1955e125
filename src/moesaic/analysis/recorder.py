"""Record routing decisions of every MoE layer during forwards (the input of routing analysis and expert placement).

``with RoutingRecorder(model) as rec: model(x)`` stores, for each MoE layer (by module path, in model
order), every forward's assignments through a forward hook on the layer's router (the layer and router
code are untouched). :meth:`RoutingRecorder.topk_ids` returns ``[T_total, k]`` expert ids per layer
(choice order, ``-1`` where a token has fewer experts, padding rows included as all ``-1``), the input of
inter-layer affinity (ExFlow: Yao et al. 2024, "Exploiting Inter-Layer Expert Affinity for Accelerating
Mixture-of-Experts Model Inference", arXiv 2401.08383). Hooks are removed on exit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.moe.layer import MoELayer


class RoutingRecorder:
    def __init__(self, model: nn.Module, top_k: int | None = None):
        self.model = model
        self.top_k = top_k
        self.layers = [(n or "moe", m) for n, m in model.named_modules() if isinstance(m, MoELayer)]
        self.records: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n, _ in self.layers}
        self._handles: list[Any] = []

    def __enter__(self) -> RoutingRecorder:
        for name, layer in self.layers:
            self._handles.append(layer.router.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(router: nn.Module, args: tuple[Any, ...], decision: Any) -> None:
            ids_TK, w_TK = decision.to_topk(self.top_k or router.top_k)
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
