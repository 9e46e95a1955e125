"""``active``: the decode backend; only the experts that received rows run, idle experts' weights are never read.

Where ``torch._grouped_mm`` works (probed once per device type and dtype, see ``kernels.py``) the active
experts run as one grouped matmul per projection: empty groups are skipped by the kernel, and one call
instead of 2k per layer matters at decode, where every matmul is tiny and a thread pool's start-up and
barrier dominate (k = 8 experts on 2 threads of a busy machine: docs/benchmarks.md, "Decode"). Elsewhere
(float64, unaligned widths, no grouped_mm) it is the readable loop over the active experts.

On the CPU, without autograd and with at most :data:`LOOP_ROWS` rows (one decode token's k choices), the loop
runs even where grouped_mm works: the CPU ``_grouped_mm`` is a loop of per-group matmuls that makes views of
every group, empty ones included (1,480 op calls for E=64, k=8 against 243 for the loop), and at these sizes
that overhead is the cost. Same matmuls on the same rows, so the result is bitwise equal (measured interleaved,
idle, 2 threads: 430 -> 319 us for E=8 k=2 F=1024, 603 -> 364 us for E=64 k=8 F=256; with 64-256 rows
grouped_mm is 10-20 % faster and keeps them). docs/benchmarks.md, "Decode: the weight-reading floor"."""

from __future__ import annotations

import torch
from torch import Tensor

from moesaic.core.split_linear import split_linear
from moesaic.core.types import DispatchPlan
from moesaic.moe.experts.backends import BACKENDS, Backend
from moesaic.moe.experts.backends.grouped_mm import GroupedMMBackend
from moesaic.moe.experts.backends.loop import per_expert
from moesaic.moe.experts.kernels import StackedFFN, compute_dtype, glu_or_act, grouped_mm_aligned, grouped_mm_usable

#: Rows (token-choices) up to which the CPU decode path loops over the active experts instead of grouped_mm.
LOOP_ROWS = 8


def per_active_expert(x_ND: Tensor, counts_E: Tensor, ffn: StackedFFN) -> Tensor:
    """The reference: expert e's FFN on its rows, for the experts with rows only. Without autograd the
    weights are indexed per active expert (``per_expert`` unbinds all E to keep gradients O(E))."""
    if torch.is_grad_enabled():
        return per_expert(x_ND, counts_E, ffn, skip_empty=True)
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            h_nF = glu_or_act(split_linear(x_ND[start:start + n], ffn.w_up_EHD[e]), ffn.activation, ffn.gated)
            outs.append(split_linear(h_nF, ffn.w_down_EDF[e]))
            start += n
    return torch.cat(outs, 0)


def one_token_counts(x_TD: Tensor, plan: DispatchPlan, weight_dtype: torch.dtype) -> list[int] | None:
    """The plan's per-expert row counts where the one-token path (:func:`one_token`) applies: one token on the
    CPU, no autograd, no Soft MoE slots, the input, the weights and the routing weights in one dtype (the
    compute dtype, so no autocast cast), each chosen expert once; else None. Experts whose weights are not
    plain tensors (quantized) use it to compute what this path computes."""
    if (x_TD.shape[0] == 1 and plan.slots is None and x_TD.device.type == "cpu" and not torch.is_grad_enabled()
            and x_TD.dtype == weight_dtype == compute_dtype(x_TD) and plan.weight_N.dtype == x_TD.dtype):
        counts = plan.counts_E.tolist()
        if 0 < max(counts) == 1:  # each expert once (a repeated expert would run a 2-row matmul)
            return counts
    return None


def one_token(x_1D: Tensor, plan: DispatchPlan, ffn: StackedFFN, counts: list[int] | None = None) -> Tensor:
    """``y_1D`` for a plan over one token that sends it to each expert at most once (a batch-1 decode step),
    without gather and combine: :func:`token_experts` on the plan's experts and weights."""
    experts = [e for e, n in enumerate(plan.counts_E.tolist() if counts is None else counts) if n]
    return token_experts(x_1D, ffn, experts, plan.weight_N.tolist())


def token_experts(x_1D: Tensor, ffn: StackedFFN, experts: list[int], weights: list[float],
                  views: ExpertViews | None = None) -> Tensor:
    """``sum_i weights[i] * FFN_{experts[i]}(x_1D)`` for one token, ``experts`` in increasing order and distinct:
    each expert runs on the token itself and its weighted output is added in that order, the order in which
    :meth:`DispatchPlan.combine` adds the rows of a plan, so the result is bitwise ``plan.combine(rows(...))``.
    ``views``: :func:`expert_views` of ``ffn`` (the same weights, without one indexing op per expert)."""
    up_E, down_E = views if views is not None else (ffn.w_up_EHD, ffn.w_down_EDF)
    y_1D = x_1D.new_zeros(1, ffn.w_down_EDF.shape[1])
    for e, w in zip(experts, weights, strict=True):
        y_e = split_linear(glu_or_act(split_linear(x_1D, up_E[e]), ffn.activation, ffn.gated), down_E[e])
        y_1D.add_(y_e * w)
    return y_1D


#: Each expert's up and down projection: ``(w_up_EHD.unbind(0), w_down_EDF.unbind(0))``.
ExpertViews = tuple[tuple[Tensor, ...], tuple[Tensor, ...]]


def expert_views(ffn: StackedFFN) -> ExpertViews:
    """The stacked weights split into per-expert views (no copy): ``views[0][e]`` is ``ffn.w_up_EHD[e]``. A decode
    step indexes these tuples instead of calling ``w[e]`` (one op) twice per chosen expert."""
    return ffn.w_up_EHD.detach().unbind(0), ffn.w_down_EDF.detach().unbind(0)


@BACKENDS.register("active")
class ActiveBackend(Backend):
    """Decode path: the experts that have rows only (grouped matmul where usable, else a loop)."""

    @classmethod
    def run(cls, x_TD: Tensor, plan: DispatchPlan, ffn: StackedFFN) -> Tensor:
        counts = one_token_counts(x_TD, plan, ffn.w_up_EHD.dtype)
        if counts is not None:
            return one_token(x_TD, plan, ffn, counts)
        return super().run(x_TD, plan, ffn)

    @classmethod
    def rows(cls, x_ND: Tensor, counts_E: Tensor, ffn: StackedFFN) -> Tensor:
        dt = compute_dtype(x_ND, ffn.w_up_EHD)
        if x_ND.shape[0] == 0:
            y_ND = x_ND.new_empty(0, ffn.w_down_EDF.shape[1], dtype=dt)
            return y_ND + 0 * (ffn.w_up_EHD.sum() + ffn.w_down_EDF.sum()).to(dt)  # keep the weights in the graph
        if x_ND.device.type == "cpu" and not torch.is_grad_enabled() and x_ND.shape[0] <= LOOP_ROWS:
            return per_active_expert(x_ND, counts_E, ffn)
        # torch.compile: grouped_mm's meta kernel accepts bf16 only (torch 2.13), so compiled code loops
        if (not torch.compiler.is_compiling() and grouped_mm_usable(x_ND.device, dt)
                and grouped_mm_aligned(x_ND, ffn.w_up_EHD, ffn.w_down_EDF, dtype=dt)):
            return GroupedMMBackend.rows(x_ND, counts_E, ffn)
        return per_active_expert(x_ND, counts_E, ffn)
