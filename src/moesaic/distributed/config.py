"""Parallel layout (``parallel:`` section). Runtime handles (process groups) never go into configs."""

from __future__ import annotations

import dataclasses

from moesaic.core.config import Section, rule


@dataclasses.dataclass
class ParallelConfig(Section):
    ep_size: int = rule(1, ge=1)
