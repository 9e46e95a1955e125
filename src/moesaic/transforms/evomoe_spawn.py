"""EvoMoE expert diversify: spawn the N experts of an MoE layer from one trained expert (Nie et al. 2021).

EvoMoE ("EvoMoE: An Evolutional Mixture-of-Experts Training Framework via Dense-To-Sparse Gate", arXiv
2112.14397) trains a single shared FFN for a while and then "spawns" diverse experts from it. Its released
code has no such step, and the paper text we could reach does not say whether the experts differ by a
random weight mask or by noise, so both readings are offered and neither is the only one:

* ``method: mask`` (the default, not claimed to be the paper's): ``W_i = W * M_i`` with an
  independent Bernoulli(``keep_ratio``) mask per expert and weight entry (``rescale: true`` divides by
  ``keep_ratio``, dropout-style, so ``E[W_i] = W``);
* ``method: noise``: ``W_i = W + eps_i`` with ``eps_i ~ N(0, (noise_std * std(W))^2)`` per tensor;
* ``method: copy``: plain copies (sparse upcycling; no diversification), useful as a control.

Every stacked expert tensor is diversified (``w_up_EHD``, ``w_down_EDF``). The source is a
:class:`~moesaic.moe.dense_ffn.DenseFFN` (the phase-1 model's FFN) or expert ``source_expert`` of the layer.
For a config-driven run that switches phase at a step, use ``experts: {kind: evomoe, diversify_step: S}``
with ``router: {kind: dts, dense_until_step: S}`` (:mod:`moesaic.moe.experts.evomoe`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from moesaic.core.errors import ConversionError
from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.experts.evomoe import diversify_
from moesaic.moe.experts.stacked_ffn import FFNExperts
from moesaic.moe.layer import MoELayer


def ffn_to_stacked(ffn: DenseFFN) -> dict[str, Tensor]:
    """A DenseFFN's weights in the experts' layout: ``w_up [H, D]`` (gate rows, then up rows), ``w_down [D, F]``."""
    up = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight]) if ffn.gated else ffn.up_proj.weight
    return {"w_up_EHD": up.detach(), "w_down_EDF": ffn.down_proj.weight.detach()}


@torch.no_grad()
def spawn_experts_(layer: MoELayer, source: DenseFFN | None = None, *,
                   method: Literal["mask", "noise", "copy"] = "mask", keep_ratio: float = 0.9,
                   rescale: bool = False, noise_std: float = 0.01, source_expert: int = 0,
                   generator: torch.Generator | None = None) -> None:
    """Overwrite every expert of ``layer`` with a diversified copy of one expert (in place)."""
    experts = layer.experts
    if not isinstance(experts, FFNExperts):
        raise ConversionError(f"{layer.layer_name}: experts kind {layer.cfg.experts.kind!r} are not stacked FFN "
                              "experts; EvoMoE diversification needs glu, mlp or ewa experts")
    if not 0.0 < keep_ratio <= 1.0:
        raise ConversionError(f"spawn_experts_: keep_ratio = {keep_ratio}: must be in (0, 1]")
    if source is not None:
        if source.bias:
            raise ConversionError(f"{layer.layer_name}: the source FFN has biases; the experts have none")
        if (source.d_model, source.d_ff, source.gated) != (experts.d_model, experts.d_ff, experts.gated):
            raise ConversionError(f"{layer.layer_name}: source FFN (d_model={source.d_model}, d_ff={source.d_ff}, "
                                  f"gated={source.gated}) does not match the experts ({experts.d_model}, "
                                  f"{experts.d_ff}, gated={experts.gated})")
        base = ffn_to_stacked(source)
    else:
        base = {n: getattr(experts, n)[source_expert].detach().clone() for n in ("w_up_EHD", "w_down_EDF")}
    if method not in ("mask", "noise", "copy"):
        raise ConversionError(f"spawn_experts_: method = {method!r}: must be mask, noise or copy")
    diversify_(experts, base, method, keep_ratio, rescale, noise_std, generator)
