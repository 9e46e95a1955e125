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
    """Context manager that records every MoE layer's top-k ids and weights (on the CPU) per forward.

    ``top_k``: the columns kept per token (default the layer's k); ``top_k=0`` keeps every expert a token
    got (variable-k routers, expert choice), padding shorter rows with ``-1``. Besides ids and weights,
    each forward's router confidence (top-1 probability and top-1 minus top-2 margin per token, NaN when
    the router has no probabilities) and its dropped assignments are kept in :attr:`confidence` and
    :attr:`dropped`.
    """

    def __init__(self, model: nn.Module, top_k: int | None = None):
        self.model = model
        self.top_k = top_k
        self.layers = [(n or "moe", m) for n, m in model.named_modules() if isinstance(m, MoELayer)]
        self.records: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n, _ in self.layers}
        self.confidence: dict[str, list[Tensor]] = {n: [] for n, _ in self.layers}  # [T, 2] per forward
        self.dropped: dict[str, int] = {n: 0 for n, _ in self.layers}
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
            k = None if self.top_k == 0 else (self.top_k or layer.top_k)
            ids_TK, w_TK = decision.to_topk(k)
            self.records[name].append((ids_TK.detach().cpu(), w_TK.detach().cpu()))
            self.confidence[name].append(_confidence(decision.probs_TE, decision.num_tokens))
            self.dropped[name] += int(decision.dropped)

        return hook

    def clear(self) -> None:
        for v in self.records.values():
            v.clear()
        for c in self.confidence.values():
            c.clear()
        self.dropped = {n: 0 for n in self.dropped}

    def topk_ids(self) -> dict[str, Tensor]:
        """Layer name -> ``[T_total, k]`` int64 expert ids of every recorded token (forwards concatenated)."""
        return {n: _cat_padded([ids for ids, _ in recs], -1) for n, recs in self.records.items()}

    def topk_weights(self) -> dict[str, Tensor]:
        """Layer name -> ``[T_total, k]`` routing weights matching :meth:`topk_ids` (0 where no expert)."""
        return {n: _cat_padded([w for _, w in recs], 0.0) for n, recs in self.records.items()}

    def tokens_per_expert(self) -> dict[str, Tensor]:
        out = {}
        for (n, layer), ids in zip(self.layers, self.topk_ids().values()):
            flat = ids.reshape(-1)
            out[n] = torch.bincount(flat[flat >= 0], minlength=layer.num_experts)
        return out


def _confidence(probs_TE: Tensor | None, num_tokens: int) -> Tensor:
    """``[T, 2]``: top-1 router probability and its margin over the second (NaN without probabilities)."""
    if probs_TE is None or probs_TE.shape[-1] < 2:
        return torch.full((num_tokens, 2), float("nan"))
    top2 = probs_TE.detach().float().topk(2, dim=-1).values.cpu()
    return torch.stack((top2[:, 0], top2[:, 0] - top2[:, 1]), dim=-1)


def _cat_padded(parts: list[Tensor], fill: float) -> Tensor:
    """Rows of every part, columns padded with ``fill`` to the widest part."""
    if not parts:
        return torch.zeros(0, 0, dtype=torch.long)
    K = max(p.shape[1] for p in parts)
    return torch.cat([p if p.shape[1] == K else torch.cat((p, p.new_full((p.shape[0], K - p.shape[1]), fill)), 1)
                      for p in parts])
