"""``prune``: drop experts of every MoE layer, keeping the best by measured usage, by saliency, or at random.

Expert pruning as in Koishekenov et al. 2023 ("Memory-efficient NLLB-200: Language-specific Expert Pruning
of a Massively Multilingual Machine Translation Model": keep the experts with the most routing mass or
importance on calibration data) and Kim et al. 2021 / DeepSpeed-MoE's "PR-MoE" analysis (most experts of a
trained layer can go with little loss). ``by``:

* ``usage``: the experts that received the most (token, expert) assignments;
* ``saliency``: the largest sum over assignments of ``router weight * ||expert output||``;
* ``random``: a seeded random subset (the control).

The kept experts' router rows are kept, so the router's softmax (or sigmoid plus renormalisation) is taken
over the kept experts only: the probabilities renormalise over what is left, and a token whose top-k
experts were all kept is routed exactly as before (with ``normalization: renorm`` or ``softmax_topk`` its
output is unchanged). Docs: docs/convert.md, "prune".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from moesaic.core.config import ConfigError, Section, rule
from moesaic.moe.layer import MoELayer
from moesaic.transforms.expert_select import (
    FilterFn,
    expert_bias,
    expert_stats,
    moe_layers,
    rebuild_layer,
    replace_layers,
)


@dataclasses.dataclass
class PruneConfig(Section):
    """Keep ``keep`` experts per layer (or ``keep_fraction`` of them) ranked ``by`` usage, saliency or at random."""

    by: Literal["usage", "saliency", "random"] = "saliency"
    keep: int | None = rule(None, ge=1)
    keep_fraction: float = rule(0.5, gt=0.0, le=1.0)
    top_k: int | None = rule(None, ge=1)  # routed k after pruning (default: unchanged, capped at keep)
    seed: int = 0

    def kept(self, num_experts: int) -> int:
        return self.keep if self.keep is not None else max(1, round(self.keep_fraction * num_experts))


def choose_experts(scores_E: Tensor | None, num_experts: int, keep: int, seed: int) -> list[int]:
    """The ``keep`` expert ids with the highest scores (ties: lower id first), or a seeded random subset
    when ``scores_E`` is None; in increasing order."""
    if scores_E is None:
        g = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(num_experts, generator=g)[:keep].tolist())
    order = sorted(range(num_experts), key=lambda e: (-float(scores_E[e]), e))
    return sorted(order[:keep])


@torch.no_grad()
def prune_layer(layer: MoELayer, keep_ids: list[int], top_k: int | None = None) -> MoELayer:
    """A new layer holding only experts ``keep_ids`` (their router rows and bias entries included)."""
    experts = [{n: t.clone() for n, t in layer.experts.expert_state(e).items()} for e in keep_ids]
    idx = torch.tensor(keep_ids, dtype=torch.long)
    bias = expert_bias(layer)
    return rebuild_layer(layer, experts, layer.router.weight[idx], bias[idx] if bias is not None else None, top_k)


def prune_(model: nn.Module, cfg: PruneConfig | None = None, filter_fn: FilterFn | None = None, *,
           calibrate: Callable[[nn.Module], object] | None = None) -> dict[str, list[int]]:
    """Prune every MoE layer (accepted by ``filter_fn(name, layer)``) in place; returns the kept expert
    ids per layer. ``calibrate(model)`` runs calibration data (needed by ``usage`` and ``saliency``)."""
    cfg = cfg or PruneConfig()
    layers = moe_layers(model, filter_fn, "prune")
    for name, layer in layers:
        E = layer.num_experts
        if cfg.kept(E) > E:
            raise ConfigError("keep", cfg.kept(E), f"{name} has only {E} experts")
    if cfg.by != "random" and calibrate is None:
        raise ConfigError("by", cfg.by, "needs calibration data (calibrate=...)")
    stats = expert_stats(model, layers, calibrate) if calibrate is not None and cfg.by != "random" else {}
    new: dict[str, MoELayer] = {}
    kept: dict[str, list[int]] = {}
    for i, (name, layer) in enumerate(layers):
        scores = stats[name][cfg.by] if stats else None
        kept[name] = choose_experts(scores, layer.num_experts, cfg.kept(layer.num_experts), cfg.seed + i)
        new[name] = prune_layer(layer, kept[name], cfg.top_k)
    replace_layers(model, new)
    return kept
