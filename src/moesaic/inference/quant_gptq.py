"""Data-aware ternary experts: GPTQ error compensation on calibration activations (QMoE's choice of values).

QMoE (Frantar & Alistarh 2023) picks each expert's ternary values with GPTQ (Frantar et al. 2023, alg. 1):
columns are quantized one at a time and each column's error, weighted by the inverse Hessian
``H = 2 X^T X`` of the layer's inputs, is pushed onto the columns not yet quantized, so the layer output
on the calibration inputs, not the weights, is what is kept close. Here the inputs of expert e are the rows
routed to it on calibration windows (its ``up`` projection) and their hidden activations under the fp32
``up`` weights (its ``down`` projection). The grid is the TWN rule of :mod:`moesaic.inference.quant_ternary`:
at the first column of each group its threshold and scale are taken from the current (error-updated)
weights of the group, GPTQ's non-static groups.

``gptq_ternary`` is the per-matrix rule; :func:`expert_hessians` collects ``X^T X`` per expert and projection;
``quantize_experts_(model, QuantConfig(ternary=True, gptq=True), hessians=expert_hessians(model, batches))``
applies it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.inference.quant_plan import run_calibration
from moesaic.moe.experts.kernels import glu_or_act
from moesaic.moe.experts.stacked_ffn import FFNExperts
from moesaic.moe.layer import MoELayer


def gptq_ternary(w_OI: Tensor, H_II: Tensor, group_size: int, threshold: float = 0.7,
                 damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Ternary values ``[O, I]`` (int8) and fp32 scales ``[O, I / g]`` of ``w_OI`` by GPTQ against the input
    second moment ``H_II`` (float64; ``damp`` times its mean diagonal is added, dead inputs are zeroed)."""
    Out, In = w_OI.shape
    g = group_size or In
    W = w_OI.detach().to(torch.float64).clone()
    H = H_II.to(torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diagonal(H).mean() * torch.eye(In, dtype=torch.float64)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    t = torch.zeros(Out, In, dtype=torch.int8)
    scale = torch.zeros(Out, In // g, dtype=torch.float64)
    delta = torch.zeros(Out, dtype=torch.float64)
    for i in range(In):
        if i % g == 0:  # the group's grid from its current weights (TWN rule)
            a = W[:, i:i + g].abs()
            delta = threshold * a.mean(-1)
            keep = a > delta[:, None]
            n = keep.sum(-1)
            scale[:, i // g] = torch.where(n > 0, (a * keep).sum(-1) / n.clamp_min(1), torch.zeros_like(delta))
        w = W[:, i]
        q = torch.sign(w) * (w.abs() > delta)
        t[:, i] = q.to(torch.int8)
        err = (w - q * scale[:, i // g]) / Hinv[i, i]
        W[:, i + 1:] -= err[:, None] * Hinv[i, i + 1:][None]
    return t, scale.float()


@torch.no_grad()
def expert_hessians(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """Per MoE layer path: ``{"up": [E, D, D], "down": [E, F, F]}``, the sums of ``x x^T`` (float64) over the
    rows routed to each expert on ``batches`` (the ``down`` inputs from the fp32 ``up`` weights)."""
    out: dict[str, dict[str, Tensor]] = {}
    handles = []
    for name, layer in model.named_modules():
        if not isinstance(layer, MoELayer) or not isinstance(layer.experts, FFNExperts):
            continue
        ex = layer.experts
        acc = {"up": torch.zeros(ex.num_experts, ex.d_model, ex.d_model, dtype=torch.float64),
               "down": torch.zeros(ex.num_experts, ex.d_ff, ex.d_ff, dtype=torch.float64)}
        out[name or "moe"] = acc

        def hook(mod: FFNExperts, args: tuple[Any, ...], acc: dict[str, Tensor] = acc) -> None:
            x_TD, plan = args[0], args[1]
            if plan.slots is not None:
                return
            rows = plan.gather(x_TD).to(torch.float64)
            start = 0
            for e, n in enumerate(plan.counts_E.tolist()):
                if n:
                    x_ND = rows[start:start + n]
                    h_NF = glu_or_act(x_ND @ mod.w_up_EHD[e].to(torch.float64).T, mod.cfg.activation, mod.gated)
                    acc["up"][e] += x_ND.T @ x_ND
                    acc["down"][e] += h_NF.T @ h_NF
                start += n

        handles.append(ex.register_forward_pre_hook(hook))
    run_calibration(model, batches, handles)
    return out
