"""A usage-driven compression plan for experts: measured routing counts -> bits per expert.

Experts are not used alike: the ones most tokens choose carry most of the output, rarely chosen ones little,
and experts no token chooses carry nothing on that data. The plan keeps the hot experts in int8, the other
used ones in int4 and prunes the unused (mixed precision by expert importance, as in MoQE, Kim et al. 2023,
with usage as the importance; pruning never-chosen experts as in expert pruning, Lu et al. 2024).
:func:`moesaic.inference.quant.quantize_experts_` applies it with ``QuantConfig(plan=True)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.moe.layer import MoELayer


def run_calibration(model: nn.Module, batches: Iterable[dict[str, Tensor]], handles: list[Any]) -> None:
    """Run ``model`` in eval mode on every batch (keyword arguments), then restore its mode and remove the
    hook ``handles`` that collect the statistics, also when a batch fails."""
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def usage_plan(counts_E: Tensor, hot_fraction: float = 0.5) -> list[int]:
    """Bits per expert from routing counts: the ``hot_fraction`` most used experts (at least one, if any was
    used) 8, the other used ones 4, experts with no tokens 0 (pruned)."""
    counts = [int(c) for c in counts_E.tolist()]
    used = [e for e in range(len(counts)) if counts[e] > 0]
    n_hot = max(1, round(hot_fraction * len(used))) if used else 0
    hot = set(sorted(used, key=lambda e: -counts[e])[:n_hot])
    return [8 if e in hot else (4 if counts[e] > 0 else 0) for e in range(len(counts))]


@torch.no_grad()
def expert_usage(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Tokens routed to each expert of each MoE layer (by module path) over ``batches`` (model keyword inputs),
    in eval mode."""
    counts: dict[str, Tensor] = {}
    handles = []
    for name, layer in model.named_modules():
        if not isinstance(layer, MoELayer):
            continue
        name = name or "moe"
        counts[name] = torch.zeros(layer.experts.num_experts, dtype=torch.long)

        def hook(lay: MoELayer, decision: Any, plan: Any, name: str = name) -> None:
            counts[name] += plan.counts_E.detach().to("cpu", torch.long)

        handles.append(layer.register_routing_hook(hook))
    run_calibration(model, batches, handles)
    return counts
