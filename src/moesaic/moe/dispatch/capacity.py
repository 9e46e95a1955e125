"""Fixed-capacity dispatch (GShard, Switch, Tutel): at most C assignments per expert, the rest dropped.

``C = ceil(capacity_factor * k * T / E)`` over the valid tokens T (k included, as in GShard's top-2
and Tutel, so a factor of 1 means "room for every assignment if perfectly balanced"), at least
``min_capacity`` and at most T. Slots are filled choice by choice: every first choice of an expert
outranks every second choice (Tutel ``extract_critical``). Within a choice rank the
order is the token order (``drop_policy: position``) or the router confidence ``max_e p[t, e]``,
highest first (``drop_policy: probs``, V-MoE batch-prioritised routing). The kept assignments get the
same plan as the dropless ``sort`` dispatcher; dropped ones are counted in ``plan.dropped``, and a token
that loses all its experts gets a zero MoE output.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Literal

import torch
from torch import Tensor

from moesaic.core.config import require, rule
from moesaic.core.types import DispatchPlan, RoutingDecision
from moesaic.moe.dispatch.base import DISPATCHERS, Dispatcher, DispatcherConfig, sort_plan


@dataclasses.dataclass
class CapacityDispatcherConfig(DispatcherConfig):
    capacity_factor: float = rule(1.25, gt=0.0)
    eval_capacity_factor: float | None = rule(2.0, gt=0.0)
    min_capacity: int = rule(0, ge=0)
    drop_policy: Literal["position", "probs"] = "position"

    def validate(self, path: str) -> None:
        if self.eval_capacity_factor is not None:
            require(math.isfinite(self.eval_capacity_factor) and self.eval_capacity_factor > 0,
                    f"{path}.eval_capacity_factor", self.eval_capacity_factor, "must be a finite number > 0")


def capacity(num_tokens: int, num_experts: int, top_k: int, factor: float, min_capacity: int = 0) -> int:
    """``min(T, max(min_capacity, ceil(factor * k * T / E)))`` (clamped to T, cf. DeepSpeed #8155).

    Exact arithmetic on the factor as written (``0.55`` is 11/20, not the binary float slightly above it),
    so ``cf = 0.55, T = 100, E = 5`` gives 11 and not 12.
    """
    exact = Fraction(repr(float(factor))) * top_k * num_tokens / num_experts
    return min(num_tokens, max(min_capacity, math.ceil(exact)))


def slot_positions(decision: RoutingDecision, priority_N: Tensor | None = None) -> Tensor:
    """Position of each assignment inside its expert's buffer: choice rank first, then priority.

    ``priority_N`` (higher first) replaces token order within a choice rank when given.
    """
    with torch.no_grad():
        n = decision.num_assignments
        dev = decision.expert_idx_N.device
        if priority_N is None:
            order = torch.argsort(decision.token_idx_N, stable=True)
        else:
            order = torch.argsort(-priority_N, stable=True)
        if decision.choice_N is not None:
            order = order[torch.argsort(decision.choice_N[order], stable=True)]
        order = order[torch.argsort(decision.expert_idx_N[order], stable=True)]
        counts_E = torch.bincount(decision.expert_idx_N, minlength=decision.num_experts)
        start_E = torch.cumsum(counts_E, 0) - counts_E
        pos_sorted = torch.arange(n, device=dev) - start_E[decision.expert_idx_N[order]]
        return torch.empty(n, dtype=torch.long, device=dev).index_copy_(0, order, pos_sorted)


@DISPATCHERS.register("capacity")
class CapacityDispatcher(Dispatcher):
    """Capacity C = ceil(cf * k * T / E); first choices first; token-order or confidence drop order."""

    Config = CapacityDispatcherConfig
    cfg: CapacityDispatcherConfig

    def capacity_for(self, valid_tokens: int) -> int:
        """Slots per expert for this many valid tokens (the eval factor in eval mode, when set)."""
        cf = self.cfg.capacity_factor
        if not self.training and self.cfg.eval_capacity_factor is not None:
            cf = self.cfg.eval_capacity_factor
        return capacity(valid_tokens, self.num_experts, self.top_k, cf, self.cfg.min_capacity)

    def keep_mask(self, decision: RoutingDecision) -> Tensor:
        """``[N]`` bool: the assignments that get a slot."""
        priority = None
        if self.cfg.drop_policy == "probs":
            if decision.probs_TE is not None:
                priority = decision.probs_TE.detach().amax(-1)[decision.token_idx_N]
            else:
                priority = decision.weight_N.detach()
        C = self.capacity_for(decision.valid_tokens)
        return slot_positions(decision, priority) < C

    def plan(self, decision: RoutingDecision) -> DispatchPlan:
        return sort_plan(decision.select(self.keep_mask(decision)))
