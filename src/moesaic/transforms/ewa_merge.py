"""Merge an MoE layer back into one dense FFN: the end of Experts Weights Averaging training.

Experts Weights Averaging (Huang et al. 2023, "Experts Weights Averaging: A New General Training Scheme for
Vision Transformers", arXiv 2308.06093): after training, every parameter tensor of the N experts is
averaged, ``W_FFN = (1/N) sum_i W_i``, and the model is the original dense network again. With the
random-partition router (weight 1 per token) the merged FFN is exact when the experts are equal, which
EWA drives them toward; for other routers the merge is the same average but not output-preserving.

Shared experts are folded in exactly: ``combine: sum`` concatenates the shared FFN's hidden units to
the merged expert (``FFN_a(x) + FFN_b(x)`` is one FFN of width ``F_a + F_b``); ``combine: average``
also halves the down projection. A sigmoid-gated shared expert cannot be folded and raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.errors import ConversionError
from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.experts.stacked_ffn import FFNExperts
from moesaic.moe.layer import MoELayer


class MergedFFN(DenseFFN):
    """A :class:`DenseFFN` that accepts the MoE layer's call signature (``mask`` and routing context),
    so it replaces the layer in place; padding rows get output 0 like in the MoE layer."""

    def forward(self, x: Tensor, mask: Tensor | None = None, **ctx: Any) -> Tensor:
        y = super().forward(x)
        if mask is not None:
            y = y * mask.reshape(*y.shape[:-1], 1).to(y.dtype)
        return y


@torch.no_grad()
def merge_layer(layer: MoELayer, name: str = "moe") -> MergedFFN:
    """One FFN whose weights are the mean of ``layer``'s experts (plus its shared experts, folded in)."""
    experts = layer.experts
    if not isinstance(experts, FFNExperts):
        raise ConversionError(f"{name}: experts kind {layer.cfg.experts.kind!r} are not stacked FFN experts; "
                              "only glu, mlp and ewa experts can be merged into one FFN")
    D, F, gated = experts.d_model, experts.d_ff, experts.gated
    up_HD = experts.w_up_EHD.mean(0)
    down_DF = experts.w_down_EDF.mean(0)
    sh_cfg, shared = layer.cfg.shared_experts, layer.shared_experts
    if shared is not None:
        if shared.bias:
            raise ConversionError(f"{name}: a shared expert with biases cannot be folded into the bias-free FFN")
        if sh_cfg.gate != "none":
            raise ConversionError(f"{name}: a sigmoid-gated shared expert cannot be folded into one FFN")
        if shared.gated != gated or shared.activation != experts.cfg.activation:
            raise ConversionError(f"{name}: shared experts ({shared.activation}, gated={shared.gated}) differ from "
                                  f"the routed experts ({experts.cfg.activation}, gated={gated})")
        if gated:
            gate_up = torch.cat([up_HD[:F], shared.gate_proj.weight, up_HD[F:], shared.up_proj.weight])
        else:
            gate_up = torch.cat([up_HD, shared.up_proj.weight])
        down_DF = torch.cat([down_DF, shared.down_proj.weight], dim=1)
        if sh_cfg.combine == "average":
            down_DF = down_DF / 2
        up_HD, F = gate_up, F + shared.d_ff
    ffn = MergedFFN(D, F, experts.cfg.activation, gated).to(device=up_HD.device, dtype=up_HD.dtype)
    if gated:
        ffn.gate_proj.weight.copy_(up_HD[:F])
        ffn.up_proj.weight.copy_(up_HD[F:])
    else:
        ffn.up_proj.weight.copy_(up_HD)
    ffn.down_proj.weight.copy_(down_DF)
    return ffn


def merge_experts_(model: nn.Module, filter_fn: Callable[[str, MoELayer], bool] | None = None
                   ) -> dict[str, MergedFFN]:
    """Replace every MoE layer of ``model`` (those where ``filter_fn(name, layer)`` is true) by the
    average of its experts, in place. Returns the new FFNs by module path. ``model`` itself cannot be
    an MoE layer (use :func:`merge_layer`)."""
    if isinstance(model, MoELayer):
        raise ConversionError("merge_experts_: the model is itself an MoE layer; use merge_layer(layer)")
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, MoELayer) and (filter_fn is None or filter_fn(n, m))]
    merged: dict[str, MergedFFN] = {}
    for name, layer in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        ffn = merge_layer(layer, name)
        ffn.train(layer.training)
        setattr(parent, attr, ffn)
        merged[name] = ffn
    return merged
