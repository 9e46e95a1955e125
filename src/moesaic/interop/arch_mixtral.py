"""Mixtral (``MixtralForCausalLM``; Jiang et al. 2024, arXiv 2401.04088).

=================================================  =============================================
Hugging Face                                       moesaic ``decoder_lm``
=================================================  =============================================
``model.layers.i.block_sparse_moe.gate``           ``model.layers.i.mlp.router`` (softmax, top-k, renorm)
``...block_sparse_moe.experts.e.w1`` / ``w3``      ``...mlp.experts.w_up_EHD[e]`` rows ``[:F]`` / ``[F:]``
``...block_sparse_moe.experts.e.w2``               ``...mlp.experts.w_down_EDF[e]``
``sliding_window``                                 ``attention.sliding_window``
=================================================  =============================================
Attention, norms, embeddings and head keep their names. Every layer is MoE; experts use
``intermediate_size``.
"""

from __future__ import annotations

from typing import Any

from moesaic.interop.common import (
    Arch,
    attention_fields,
    body_rules,
    expert_rules,
    hf_field,
    llama_hf_fields,
    llama_model_fields,
    mha_names,
    moe_features,
    moe_layers,
    per_layer_variants,
    refuse,
    register_archs,
)
from moesaic.interop.mapping import Layout

NAME = "mixtral"
IGNORE = [(r"\.rotary_emb\.inv_freq$", "recomputed from rope_theta")]


def to_moesaic(hf: Any) -> dict[str, Any]:
    if hf_field(hf, "router_jitter_noise", 0.0):
        refuse(NAME, "router_jitter_noise", hf.router_jitter_noise, "moesaic routers have no multiplicative jitter")
    cfg = llama_model_fields(hf, NAME)
    cfg["attention"] = attention_fields(hf, NAME, sliding_window=hf_field(hf, "sliding_window"))
    cfg["moe"] = {"d_ff": hf.intermediate_size, "num_experts": hf.num_local_experts, "top_k": hf.num_experts_per_tok,
                  "router": {"kind": "topk", "score_func": "softmax", "normalization": "renorm",
                             "aux_loss_coef": float(hf_field(hf, "router_aux_loss_coef", 0.0))}}
    return cfg


def unsupported(cfg: Any) -> list[str]:
    out = [f"{NAME} lacks {x}" for x in per_layer_variants(cfg, NAME)]
    a = cfg.attention
    if a.kind != "mha" or a.bias or a.o_bias or a.qk_norm:
        out.append(f"{NAME} lacks attention {a.kind} with bias/q-k norm")
    if cfg.moe is None or len(moe_layers(cfg)) != cfg.num_layers:
        out.append(f"{NAME} lacks dense layers (every Mixtral layer is MoE)")
    else:
        out += moe_features(cfg.moe, arch=NAME, norms=("renorm",))
    return out


def to_hf(cfg: Any) -> dict[str, Any]:
    m = cfg.moe
    return {**llama_hf_fields(cfg), "intermediate_size": m.d_ff, "num_local_experts": m.num_experts,
            "num_experts_per_tok": m.top_k, "sliding_window": cfg.attention.sliding_window,
            "router_aux_loss_coef": m.router.aux_loss_coef}


def layout(hf: Any, expert_layout: str) -> Layout:
    rules = body_rules(hf, mha_names())
    for i in range(hf.num_hidden_layers):
        rules += expert_rules(i, hf.num_local_experts, expert_layout, legacy_block="block_sparse_moe",
                              legacy_names=("w1", "w3", "w2"))
    return Layout(f"{NAME} ({expert_layout} experts)", rules, IGNORE)


register_archs(Arch(NAME, "mixtral", "MixtralForCausalLM", to_moesaic, to_hf, unsupported, layout, rank=10))
