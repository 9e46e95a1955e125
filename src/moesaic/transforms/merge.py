"""``merge``: merge groups of experts of every MoE layer into one expert each (average, or OT-aligned).

Groups of ``E / target`` experts are formed by balanced k-means of the normalised router rows (experts the
router treats alike are merged; :func:`moesaic.transforms.neuron_split.balanced_kmeans`). Each group
becomes one expert:

* ``method: average``: the element-wise mean of the group's weights (a merge without alignment; the
  weights-averaging baseline of model-merging papers);
* ``method: ot``: Transformer Fusion with Optimal Transport (Imfeld et al. 2024; Singh & Jaggi 2020,
  "Model Fusion via Optimal Transport"): the hidden neurons of every member are first permuted to match
  the group's first expert (an exact OT plan between equal uniform measures is a permutation, found with
  ``scipy.optimize.linear_sum_assignment`` on the negated cosine similarity of each neuron's incoming and
  outgoing weights), then averaged. Neuron permutation does not change an expert's function, so an expert
  merged with a permuted copy of itself is recovered exactly (tested).

The merged expert's router row is the mean of the group's rows (its bias entry the mean bias). Docs:
docs/convert.md, "merge".
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor, nn

from moesaic.core.config import ConfigError, Section, rule
from moesaic.moe.experts.stacked_ffn import FFNExperts
from moesaic.moe.layer import MoELayer
from moesaic.transforms.expert_select import FilterFn, expert_bias, moe_layers, rebuild_layer, replace_layers
from moesaic.transforms.neuron_split import balanced_kmeans


@dataclasses.dataclass
class MergeConfig(Section):
    """Merge each layer's experts into ``num_experts`` (or ``fraction`` of E) by ``method``."""

    method: Literal["average", "ot"] = "ot"
    num_experts: int | None = rule(None, ge=1)
    fraction: float = rule(0.5, gt=0.0, le=1.0)
    top_k: int | None = rule(None, ge=1)
    seed: int = 0

    def target(self, E: int) -> int:
        return self.num_experts if self.num_experts is not None else max(1, round(self.fraction * E))


def neuron_features(experts: FFNExperts, e: int) -> Tensor:
    """Per hidden neuron ``[F, *]``: its incoming rows (gate and up) and outgoing column, concatenated."""
    F = experts.d_ff
    up_HD, down_DF = experts.w_up_EHD[e], experts.w_down_EDF[e]
    parts = [up_HD[:F], up_HD[F:]] if experts.gated else [up_HD]
    return torch.cat(parts + [down_DF.t()], dim=1)


def permute_neurons(experts: FFNExperts, e: int, perm_F: Tensor) -> dict[str, Tensor]:
    """Expert e with hidden neuron ``perm_F[i]`` moved to position i (the same function)."""
    F = experts.d_ff
    up_HD, down_DF = experts.w_up_EHD[e], experts.w_down_EDF[e]
    up = torch.cat([up_HD[:F][perm_F], up_HD[F:][perm_F]]) if experts.gated else up_HD[perm_F]
    return {"w_up_EHD": up.clone(), "w_down_EDF": down_DF[:, perm_F].clone()}


def ot_align(experts: FFNExperts, anchor: int, e: int) -> Tensor:
    """The permutation of expert e's neurons that best matches the anchor's (max total cosine similarity)."""
    from scipy.optimize import linear_sum_assignment

    a = torch.nn.functional.normalize(neuron_features(experts, anchor).double(), dim=1)
    b = torch.nn.functional.normalize(neuron_features(experts, e).double(), dim=1)
    rows, cols = linear_sum_assignment(-(a @ b.t()).cpu().numpy())
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


@torch.no_grad()
def merge_group(experts: FFNExperts, group: list[int], method: str) -> dict[str, Tensor]:
    """One expert from the group's experts (``ot``: aligned to the first member, then averaged)."""
    states = []
    for e in group:
        perm = ot_align(experts, group[0], e) if method == "ot" and e != group[0] else torch.arange(experts.d_ff)
        states.append(permute_neurons(experts, e, perm))
    return {n: torch.stack([s[n] for s in states]).mean(0) for n in states[0]}


def expert_groups(router_rows_ED: Tensor, target: int, seed: int) -> list[list[int]]:
    """Balanced groups of experts with similar (normalised) router rows."""
    E = router_rows_ED.shape[0]
    if target == E:
        return [[e] for e in range(E)]
    rows = torch.nn.functional.normalize(router_rows_ED.detach().double(), dim=1).cpu().numpy()
    labels = balanced_kmeans(rows, target, seed=seed)
    groups = [sorted(int(e) for e in (labels == g).nonzero()[0]) for g in range(target)]
    return sorted(groups)


@torch.no_grad()
def merge_layer_experts(layer: MoELayer, groups: list[list[int]], method: str, top_k: int | None = None) -> MoELayer:
    experts = layer.experts
    assert isinstance(experts, FFNExperts)
    merged = [merge_group(experts, g, method) for g in groups]
    rows = torch.stack([layer.router.weight[g].mean(0) for g in groups])
    bias = expert_bias(layer)
    new_bias = torch.stack([bias[g].mean() for g in groups]) if bias is not None else None
    return rebuild_layer(layer, merged, rows, new_bias, top_k)


def merge_(model: nn.Module, cfg: MergeConfig | None = None, filter_fn: FilterFn | None = None
           ) -> dict[str, list[list[int]]]:
    """Merge the experts of every MoE layer (accepted by ``filter_fn``) in place; returns the groups."""
    cfg = cfg or MergeConfig()
    layers = moe_layers(model, filter_fn, "merge")
    for name, layer in layers:
        E, t = layer.num_experts, cfg.target(layer.num_experts)
        if t > E or E % t:
            raise ConfigError("num_experts", t, f"{name}: the expert count {E} must be divisible by the merged count")
    new, groups = {}, {}
    for name, layer in layers:
        groups[name] = expert_groups(layer.router.weight, cfg.target(layer.num_experts), cfg.seed)
        new[name] = merge_layer_experts(layer, groups[name], cfg.method, cfg.top_k)
    replace_layers(model, new)
    return groups
