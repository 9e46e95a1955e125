"""The Soft MoE dispatcher (Puigcerver et al. 2024, "From Sparse to Soft Mixtures of Experts"), paired
with the ``soft_moe`` router.

Per sequence b with tokens ``X_b`` ``[m, d]`` and logits ``L_b`` ``[m, n*p]``:
``D = softmax(L, over tokens)``, slots ``X_slots = D^T X_b`` ``[n*p, d]`` (expert i gets slots
``[i*p, (i+1)*p)`` of every sequence), ``C = softmax(L, over slots)``, ``Y_b = C @ Y_slots``.
Sequences of different lengths are padded to the longest; padding gets ``-inf`` dispatch logits and a
zero combine row, so it neither feeds a slot nor receives an output. A sequence without any real token
makes no slots. The plan carries ``D`` and ``C`` (:class:`moesaic.core.types.SlotMixing`); the mixing
itself runs in the plan's ``gather``/``combine``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from moesaic.core.errors import RoutingInputError
from moesaic.core.types import DispatchPlan, RoutingDecision, SlotMixing
from moesaic.moe.dispatch.base import DISPATCHERS, Dispatcher, DispatcherConfig


@dataclasses.dataclass
class SoftDispatcherConfig(DispatcherConfig):
    """Soft MoE slot mixing has no settings: the slots come from the router's decision."""


def soft_weights(logits_BMS: Tensor, mask_BM: Tensor) -> tuple[Tensor, Tensor]:
    """Dispatch ``D`` (softmax over tokens m; columns sum to 1) and combine ``C`` (softmax over slots;
    rows sum to 1) for padded sequences. Masked tokens get 0 in both; an all-padding sequence gives 0."""
    neg = torch.finfo(logits_BMS.dtype).min
    masked = logits_BMS.masked_fill(~mask_BM[:, :, None], neg)
    D = masked.softmax(dim=1) * mask_BM[:, :, None].to(logits_BMS.dtype)
    C = logits_BMS.softmax(dim=2) * mask_BM[:, :, None].to(logits_BMS.dtype)
    return D, C


@DISPATCHERS.register("soft")
class SoftDispatcher(Dispatcher):
    """Soft MoE slots: softmax-weighted token mixes per sequence in, slot-weighted mixes out (no drops)."""

    Config = SoftDispatcherConfig

    def plan(self, decision: RoutingDecision) -> DispatchPlan:
        if "logits_TS" not in decision.extra:
            raise RoutingInputError("the soft dispatcher needs the soft_moe router's decisions")
        ex = decision.extra
        L_TS, mask_T, seq_T = ex["logits_TS"], ex["mask_T"], ex["seq_T"]
        p = int(ex["slots_per_expert"])
        T, n, S, dev = decision.num_tokens, decision.num_experts, L_TS.shape[1], L_TS.device
        with torch.no_grad():
            # Only sequences with a real token make slots (an all-padding batch runs no expert).
            _, b_T = torch.unique(seq_T, return_inverse=True)
            live_B = torch.zeros(int(b_T.max()) + 1 if T else 0, dtype=torch.bool, device=dev)
            live_B = live_B.index_fill(0, b_T[mask_T], True)
            rows = live_B[b_T].nonzero().squeeze(1)
            _, b_L = torch.unique(b_T[rows], return_inverse=True)  # live sequences renumbered 0..B-1
            B = int(b_L.max()) + 1 if rows.numel() else 0
            order = torch.argsort(b_L, stable=True)
            per_b = torch.bincount(b_L, minlength=B)
            start = torch.cumsum(per_b, 0) - per_b
            pos_L = torch.empty_like(b_L)
            pos_L[order] = torch.arange(b_L.numel(), device=b_L.device) - start[b_L[order]]
            M = int(per_b.max()) if B else 0
        L_BMS = L_TS.new_zeros(B, M, S).index_put((b_L, pos_L), L_TS[rows])
        mask_BM = torch.zeros(B, M, dtype=torch.bool, device=dev).index_put((b_L, pos_L), mask_T[rows])
        disp_BMS, comb_BMS = soft_weights(L_BMS, mask_BM)
        counts_E = torch.full((n,), B * p, dtype=torch.long, device=dev)
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        slots = SlotMixing(disp_BMS, comb_BMS, rows, b_L, pos_L, mask_T[rows], p)
        return DispatchPlan(empty, L_TS.new_zeros(0), counts_E, T, 0, slots=slots)
