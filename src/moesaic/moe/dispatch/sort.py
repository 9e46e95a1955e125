"""Dropless dispatch by a stable sort of the assignments by expert (MegaBlocks: Gale et al. 2023)."""

from __future__ import annotations

import dataclasses

from moesaic.core.types import DispatchPlan, RoutingDecision
from moesaic.moe.dispatch.base import DISPATCHERS, Dispatcher, DispatcherConfig, sort_plan


@dataclasses.dataclass
class SortDispatcherConfig(DispatcherConfig):
    """The dropless sort has no settings."""


@DISPATCHERS.register("sort")
class SortDispatcher(Dispatcher):
    """Dropless: every assignment is computed; memory O(N*D), no [T, E] one-hot (the default)."""

    Config = SortDispatcherConfig

    def plan(self, decision: RoutingDecision) -> DispatchPlan:
        return sort_plan(decision)
