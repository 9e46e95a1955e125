"""``densify``: MoE to dense, every MoE layer replaced by the average of its experts (shared experts folded in).

Experts Weights Averaging (Huang et al. 2023, arXiv 2308.06093): ``W_FFN = (1/N) sum_i W_i``; exact when the
experts are equal (what EWA training drives them toward), the weights-average approximation otherwise. The
implementation is :mod:`moesaic.transforms.ewa_merge`; this module gives it the verb form
``densify_(model, cfg, filter_fn)`` of the other conversion verbs. Docs: docs/convert.md, "densify".
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from moesaic.core.config import Section
from moesaic.transforms.ewa_merge import MergedFFN, merge_experts_
from moesaic.transforms.expert_select import FilterFn, moe_layers


@dataclasses.dataclass
class DensifyConfig(Section):
    """No settings yet: the EWA average is the one MoE-to-dense merge implemented."""

    method: Literal["ewa_average"] = "ewa_average"


def densify_(model: nn.Module, cfg: DensifyConfig | None = None, filter_fn: FilterFn | None = None
             ) -> dict[str, MergedFFN]:
    """Replace every MoE layer (accepted by ``filter_fn``) by one dense FFN in place; returns them by path."""
    moe_layers(model, filter_fn, "densify", need_router=False)  # typed refusals before anything changes
    return merge_experts_(model, filter_fn)
