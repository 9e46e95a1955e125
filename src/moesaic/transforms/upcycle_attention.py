"""BAM's attention upcycling (Zhang et al. 2024, "BAM! Just Like That: Simple and Efficient Parameter Upcycling
for Mixture of Experts"): the attention of several dense seeds becomes one mixture-of-attention layer
(``moa``, :mod:`moesaic.models.attention_moa`) whose expert ``a`` is the attention of seed ``a % n``.

* **Variant.** ``attention_shared_kv: false`` (the default) is BAM's full variant: every expert keeps its
  seed's ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``. ``true`` is BAM's KV-sharing variant: experts keep
  their own ``q_proj``/``o_proj`` and share one ``k_proj``/``v_proj``, a non-expert parameter that follows
  ``non_expert`` (the first seed's, or the mean over the seeds).
* **Routing.** ``attention_top_k: null`` (default) is BAM's soft routing: every attention expert is active and
  weighted by the softmax of the router (``topk`` router with k = E and ``normalization: none``); a smaller k
  is top-k routing with the FFN router's normalisation. The router starts ``zero`` (uniform weights) or
  ``random`` (normal, ``router_std``).
* **Exactness.** The combine weights of one token sum to one, so with identical experts (N copies of one
  dense model) the layer computes the dense attention at step 0.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moesaic.core.errors import ConversionError
from moesaic.models.attention import MHAConfig, MultiHeadAttention
from moesaic.models.attention_moa import MixtureOfAttentionHeads, MoAAttentionConfig
from moesaic.moe.routing.base import RouterConfig

_COPIED = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention_experts(cfg: Any, n_inputs: int) -> tuple[int, int]:
    """(attention experts A, active k) of an upcycle config: A defaults to the number of inputs (one expert per
    dense seed, BAM), k to A (soft routing)."""
    A = cfg.attention_experts or n_inputs
    k = cfg.attention_top_k or A
    if A % n_inputs:
        raise ConversionError(f"upcycle.attention_experts = {A}: not divisible by the number of inputs ({n_inputs}); "
                              "every dense seed must give the same number of attention experts")
    if k > A:
        raise ConversionError(f"upcycle.attention_top_k = {k}: must be <= attention_experts ({A})")
    return A, k


def moa_config(attn: Any, cfg: Any, n_inputs: int, layers: Sequence[int]) -> MoAAttentionConfig:
    """The ``moa`` config that holds ``attn`` (an ``mha`` config) as experts; refuses what ``moa`` cannot hold."""
    where = f"layers {list(layers)}: attention"
    if type(attn) is not MHAConfig:
        kind = getattr(attn, "kind", type(attn).__name__)
        raise ConversionError(f"{where} kind {kind!r} cannot be upcycled into moa (only mha / GQA / MQA attention "
                              "has the q/k/v/o projections that become attention experts)")
    if attn.qk_norm:
        raise ConversionError(f"{where} has qk_norm (per-head q/k RMSNorm), which moa attention does not support")
    A, k = attention_experts(cfg, n_inputs)
    router = RouterConfig.for_kind("topk")
    soft = k == A
    router.normalization = "none" if soft else cfg.normalization  # type: ignore[attr-defined]
    router.aux_loss_coef = 0.0 if soft else cfg.aux_loss_coef  # every expert active: nothing to balance
    router.init_std = cfg.router_std
    fields = {f.name: copy.deepcopy(getattr(attn, f.name)) for f in dataclasses.fields(MHAConfig) if f.name != "kind"}
    return MoAAttentionConfig(**fields, num_experts=A, top_k=k, shared_kv=cfg.attention_shared_kv, router=router)


def check_attention(bodies: Sequence[Any], idx: Sequence[int]) -> None:
    """Every chosen layer of every input holds plain ``mha`` attention (checked before anything changes)."""
    for j, body in enumerate(bodies):
        for i in idx:
            attn = body.layers[i].self_attn
            if type(attn) is not MultiHeadAttention:
                raise ConversionError(f"input {j + 1}: layers.{i}.self_attn is {type(attn).__name__}; only mha "
                                      "attention can be upcycled into moa")


@torch.no_grad()
def build_moa_layer(moa: MoAAttentionConfig, srcs: Sequence[MultiHeadAttention], d_model: int, layer_idx: int,
                    *, causal: bool, norm_eps: float, router_init: str, average_kv: bool) -> MixtureOfAttentionHeads:
    """A ``moa`` layer whose expert ``a`` copies ``srcs[a % n]`` (q/o, and k/v unless shared; shared k/v are
    ``srcs[0]``'s or, with ``average_kv``, their mean)."""
    ref = srcs[0].q_proj.weight
    layer = MixtureOfAttentionHeads(moa, d_model, layer_idx, causal=causal, norm_eps=norm_eps).to(
        device=ref.device, dtype=ref.dtype)
    for a, ex in enumerate(layer.experts):
        src = srcs[a % len(srcs)]
        for name in _COPIED:
            if hasattr(ex, name):
                _copy_linear(getattr(ex, name), [getattr(src, name)])
    if moa.shared_kv:
        kv_srcs = srcs if average_kv else srcs[:1]
        for name in ("k_proj", "v_proj"):
            _copy_linear(getattr(layer, name), [getattr(s, name) for s in kv_srcs])
    if router_init == "zero":
        nn.init.zeros_(layer.router.weight)
    return layer


def _copy_linear(dst: nn.Linear, srcs: Sequence[nn.Linear]) -> None:
    dst.weight.copy_(torch.stack([s.weight.to(dst.weight.dtype) for s in srcs]).mean(0))
    if dst.bias is not None:
        dst.bias.copy_(torch.stack([s.bias.to(dst.bias.dtype) for s in srcs]).mean(0))
