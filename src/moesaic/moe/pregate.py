"""Read-ME-style pre-gating: predict a layer's expert choice from the hidden state *before* the layer's block
runs, so that the experts can be fetched (offloaded inference) or scheduled ahead of time.

Cai et al. 2024, "Read-ME: Refactorizing LLMs as Router-Decoupled Mixture of Experts with System Co-Design":
the router is decoupled from the layer it serves and computed from earlier hidden states, which lets the
system prefetch and batch by expert. Here a :class:`PreGate` is a small MLP (or a linear map) fitted on
activations to imitate an existing router (``moesaic.transforms.pregate.fit_pregates``); the layer keeps
its own router, so outputs are unchanged and the pre-gate is only a hint.

Call: ``scores_TE = pregate(hidden_prev_TD)`` where ``hidden_prev`` is the residual stream entering the
block that holds the MoE layer (``[T, D]`` or ``[B, S, D]``; the output has the same leading shape and E
scores, higher = more likely chosen). ``pregate.topk(hidden_prev, k)`` returns the predicted expert ids.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PreGate(nn.Module):
    """``scores = W_2 relu(W_1 h + b_1) + b_2`` (``hidden = 0``: one linear map ``W h + b``)."""

    def __init__(self, d_model: int, num_experts: int, hidden: int = 0):
        super().__init__()
        self.d_model, self.num_experts = d_model, num_experts
        self.net: nn.Module = (nn.Linear(d_model, num_experts) if hidden == 0 else
                               nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, num_experts)))

    def forward(self, hidden_prev: Tensor) -> Tensor:
        """Expert scores ``[..., E]`` from the hidden state entering the block ``[..., D]``."""
        out: Tensor = self.net(hidden_prev)
        return out

    @torch.no_grad()
    def topk(self, hidden_prev: Tensor, k: int) -> Tensor:
        """Predicted expert ids ``[..., k]`` (the prefetch hint)."""
        scores: Tensor = self(hidden_prev)
        return scores.topk(k, dim=-1).indices
