"""Random Uniform Partition routing of Experts Weights Averaging (EWA; Huang et al. 2023, arXiv 2308.06093).

Each training iteration randomly permutes the valid tokens of the batch, splits them into
``E`` chunks whose sizes differ by at most 1 and sends chunk i to expert i with weight 1. No scoring
weights, no aux loss. The weight averaging that goes with it is the ``ewa`` experts kind
(:mod:`moesaic.moe.experts.ewa`); the conversion back to one FFN is :func:`moesaic.transforms.ewa_merge.merge_experts_`.

Eval is our choice, since the paper merges the experts before evaluating and so never routes at eval:
``eval_mode: partition`` uses a deterministic partition (contiguous chunks in token order, so the result
does not depend on a random state); ``eval_mode: average`` sends every token to all experts with weight
``1/E`` (an ensemble; it equals the merged FFN only when the experts are equal).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor

from moesaic.core.config import LayerShape, require
from moesaic.core.types import RoutingDecision
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig, router_dtype


@dataclasses.dataclass
class RandomPartitionRouterConfig(RouterConfig):
    eval_mode: Literal["partition", "average"] = "partition"

    def validate_moe(self, path: str, layer: LayerShape) -> None:
        super().validate_moe(path, layer)
        top_k = layer.routed_top_k
        require(top_k == 1, path.rsplit(".", 1)[0] + ".top_k", top_k,
                "random uniform partition sends each token to exactly one expert; top_k must be 1")


def partition_ids(num_tokens: int, num_experts: int, perm_T: Tensor | None = None,
                  device: torch.device | None = None) -> Tensor:
    """Expert id of every token: chunk i of the (permuted) token order goes to expert i.

    Chunk sizes are ``ceil`` for the first ``T mod E`` experts and ``floor`` for the rest, so the
    loads differ by at most 1.
    """
    base, extra = divmod(num_tokens, num_experts)
    sizes = torch.full((num_experts,), base, dtype=torch.long, device=device)
    sizes[:extra] += 1
    ids_sorted = torch.repeat_interleave(torch.arange(num_experts, device=device), sizes)
    if perm_T is None:
        return ids_sorted
    return torch.empty_like(ids_sorted).index_copy_(0, perm_T, ids_sorted)


@ROUTERS.register("random_partition")
class RandomPartitionRouter(Router):
    """EWA random uniform partition: a random permutation split into E equal chunks, weight 1 (Huang 2023)."""

    Config = RandomPartitionRouterConfig
    cfg: RandomPartitionRouterConfig
    has_weight = False
    required_top_k = 1

    def route(self, x_TD: Tensor, **ctx: Any) -> RoutingDecision:
        T, E = x_TD.shape[0], self.num_experts
        dev, dt = x_TD.device, router_dtype(x_TD)
        if not self.training and self.cfg.eval_mode == "average":
            ids_TK = torch.arange(E, device=dev).expand(T, E)
            w_TK = torch.full((T, E), 1.0 / E, dtype=dt, device=dev)
            return RoutingDecision.from_topk(ids_TK, w_TK, E)
        perm_T = torch.randperm(T, device=dev) if self.training else None
        ids_T1 = partition_ids(T, E, perm_T, dev).unsqueeze(1)
        return RoutingDecision.from_topk(ids_T1, torch.ones(T, 1, dtype=dt, device=dev), E)

    def loss_coefs(self) -> dict[str, float]:
        return {}
