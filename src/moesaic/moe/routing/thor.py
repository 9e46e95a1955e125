"""THOR: stochastic experts (Zuo et al. 2022, "Taming Sparsely Activated Transformer with Stochastic
Experts", microsoft/Stochastic-Mixture-of-Experts ``thor/transformer_thor_layer.py``).

No router and no gate weight: in training each layer draws one expert uniformly at random and every token
of the batch uses it (``granularity: batch``, as the code does; ``sequence`` and ``token`` draw per
sequence / per token, options the code does not have). Weight 1. At inference the code computes all experts and keeps
a random one per token (``inference_level: 0``, config default) or per sentence (``1``, used in the
IWSLT script); here only the chosen expert runs. ``inference_average: true`` averages all experts
instead (an option; the code does not do this). The randomness comes from torch's global generator, so a
fixed seed reproduces the draws. The consistency-regularised loss is :func:`thor_consistency_loss`; the
two-pass training step is :func:`moesaic.train.objectives.thor.thor_step`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor

from moesaic.core.types import RoutingDecision
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig, router_dtype


@dataclasses.dataclass
class THORRouterConfig(RouterConfig):
    """``granularity`` of the training draw; ``inference_level`` 0 = a random expert per token, 1 = per
    sequence; ``inference_average`` = mean of all experts at inference. The layer's ``top_k`` must be 1."""

    granularity: Literal["batch", "sequence", "token"] = "batch"
    inference_level: Literal[0, 1] = 0
    inference_average: bool = False
    aux_loss_coef: float = 0.0


@ROUTERS.register("thor")
class THORRouter(Router):
    """THOR stochastic experts: a uniformly random expert per batch/sequence/token, no gate (Zuo et al. 2022)."""

    Config = THORRouterConfig
    cfg: THORRouterConfig
    has_weight = False
    required_top_k = 1
    stochastic_eval = True  # inference draws a random expert per token or sentence, like the code

    def _draw(self, T: int, level: str, seq_ids_T: Tensor | None, device: torch.device) -> Tensor:
        E = self.num_experts
        if level == "token":
            return torch.randint(E, (T,)).to(device)
        if level == "sequence" and seq_ids_T is not None and T > 0:
            _, seq_T = torch.unique(seq_ids_T, return_inverse=True)
            per_seq = torch.randint(E, (int(seq_T.max()) + 1,)).to(device)
            return per_seq[seq_T.to(device)]
        return torch.randint(E, (1,)).to(device).expand(T)  # one draw for the batch (or the one sequence)

    def route(self, x_TD: Tensor, seq_ids_T: Tensor | None = None, **ctx: Any) -> RoutingDecision:
        T, E = x_TD.shape[0], self.num_experts
        dt = router_dtype(x_TD)
        if not self.training and self.cfg.inference_average:
            ids_TK = torch.arange(E, device=x_TD.device).expand(T, E)
            return RoutingDecision.from_topk(ids_TK, torch.full((T, E), 1.0 / E, dtype=dt, device=x_TD.device), E)
        level = self.cfg.granularity if self.training else ("token", "sequence")[self.cfg.inference_level]
        ids_T = self._draw(T, level, seq_ids_T, x_TD.device)
        return RoutingDecision.from_topk(ids_T[:, None].clone(), torch.ones(T, 1, dtype=dt, device=x_TD.device), E)


def thor_consistency_loss(logits1: Tensor, logits2: Tensor, mask: Tensor | None = None) -> Tensor:
    """``CR = 0.5 * sum_{non-pad positions} sum_v (P1_v - P2_v) (log P1_v - log P2_v)`` (Zuo et al. 2022, the
    consistency regulariser of THOR's training objective).

    Equals ``0.5 * [KL(P1||P2) + KL(P2||P1)]`` summed over positions (fairseq sum reduction). Computed in
    fp32 (fp64 stays fp64) with ``log_softmax``; gradients flow through both passes. ``logits`` are
    ``[..., V]``; ``mask`` (``[...]``, True = real position) drops padding.
    """
    dt = torch.float64 if logits1.dtype == torch.float64 else torch.float32
    lp1 = torch.log_softmax(logits1.to(dt), dim=-1)
    lp2 = torch.log_softmax(logits2.to(dt), dim=-1)
    sym_N = ((lp1.exp() - lp2.exp()) * (lp1 - lp2)).sum(-1)
    if mask is not None:
        sym_N = sym_N * mask.to(torch.bool).to(dt)
    return 0.5 * sym_N.sum()
