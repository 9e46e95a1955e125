"""OLMoE (``OlmoeForCausalLM``; Muennighoff et al. 2024, arXiv 2409.02060).

====================================================  ===============================================
Hugging Face                                          moesaic ``decoder_lm``
====================================================  ===============================================
``self_attn.q_norm`` ``[H*d]``, ``k_norm`` ``[Hkv*d]``  ``attention.qk_norm: true``,
                                                      ``qk_norm_scope: projection`` (before the head split)
``attention_bias``                                    ``attention.bias`` and ``o_bias``
``mlp.gate``; ``mlp.experts.e.{gate,up,down}_proj``   ``mlp.router``; ``mlp.experts.w_up_EHD`` / ``w_down_EDF``
``norm_topk_prob``                                    ``router.normalization: renorm`` (else ``none``)
====================================================  ===============================================
``clip_qkv`` (clamping q/k/v) has no moesaic equivalent and is refused when set.
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

NAME = "olmoe"
IGNORE = [(r"\.rotary_emb\.inv_freq$", "recomputed from rope_theta")]


def to_moesaic(hf: Any) -> dict[str, Any]:
    if hf_field(hf, "clip_qkv") is not None:
        refuse(NAME, "clip_qkv", hf.clip_qkv, "moesaic attention does not clamp q/k/v")
    cfg = llama_model_fields(hf, NAME)
    bias = bool(hf_field(hf, "attention_bias", False))
    cfg["attention"] = attention_fields(hf, NAME, bias=bias, o_bias=bias, qk_norm=True, qk_norm_scope="projection")
    cfg["moe"] = {"d_ff": hf.intermediate_size, "num_experts": hf.num_experts, "top_k": hf.num_experts_per_tok,
                  "router": {"kind": "topk", "score_func": "softmax",
                             "normalization": "renorm" if hf_field(hf, "norm_topk_prob", False) else "none",
                             "aux_loss_coef": float(hf_field(hf, "router_aux_loss_coef", 0.0))}}
    return cfg


def unsupported(cfg: Any) -> list[str]:
    out = [f"{NAME} lacks {x}" for x in per_layer_variants(cfg, NAME)]
    a = cfg.attention
    if a.kind != "mha" or not a.qk_norm or a.qk_norm_scope != "projection" or a.bias != a.o_bias \
            or a.sliding_window is not None:
        out.append(f"{NAME} lacks attention other than q/k norm over the whole projection")
    if cfg.moe is None or len(moe_layers(cfg)) != cfg.num_layers:
        out.append(f"{NAME} lacks dense layers (every OLMoE layer is MoE)")
    else:
        out += moe_features(cfg.moe, arch=NAME, norms=("renorm", "none"))
    return out


def to_hf(cfg: Any) -> dict[str, Any]:
    m = cfg.moe
    return {**llama_hf_fields(cfg), "intermediate_size": m.d_ff, "num_experts": m.num_experts,
            "num_experts_per_tok": m.top_k, "norm_topk_prob": m.router.normalization != "none",
            "attention_bias": cfg.attention.bias, "clip_qkv": None, "router_aux_loss_coef": m.router.aux_loss_coef}


def layout(hf: Any, expert_layout: str) -> Layout:
    bias = bool(hf_field(hf, "attention_bias", False))
    rules = body_rules(hf, mha_names(qkv_bias=bias, o_bias=bias, qk_norm=True))
    for i in range(hf.num_hidden_layers):
        rules += expert_rules(i, hf.num_experts, expert_layout)
    return Layout(f"{NAME} ({expert_layout} experts)", rules, IGNORE)


register_archs(Arch(NAME, "olmoe", "OlmoeForCausalLM", to_moesaic, to_hf, unsupported, layout, rank=30))
