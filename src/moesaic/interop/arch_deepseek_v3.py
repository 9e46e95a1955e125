"""DeepSeek-V3 (``DeepseekV3ForCausalLM``; DeepSeek-AI 2024, arXiv 2412.19437).

======================================================  ==============================================
Hugging Face                                            moesaic ``decoder_lm``
======================================================  ==============================================
``self_attn.{q_a_proj,q_a_layernorm,q_b_proj}`` or       ``attention: {kind: mla}`` with the same names
``q_proj``; ``kv_a_proj_with_mqa``, ``kv_a_layernorm``,  (:mod:`moesaic.models.mla`); ``rope_interleave``,
``kv_b_proj``, ``o_proj``                                ``q_lora_rank``, ``kv_lora_rank``, head widths
``mlp.gate.weight``                                     ``mlp.router.weight``: ``score_func: sigmoid``,
                                                        ``n_groups: n_group``, ``topk_groups: topk_group``,
                                                        ``routed_scaling_factor``, ``norm_topk_prob`` ->
                                                        ``normalization: renorm`` (else ``none``)
``mlp.gate.e_score_correction_bias``                    ``mlp.router.expert_bias`` (``expert_bias: true``)
``mlp.experts.e.{gate,up,down}_proj``                   ``mlp.experts.w_up_EHD`` / ``w_down_EDF``
``mlp.shared_experts.*``                                ``mlp.shared_experts.*`` (``num: n_shared_experts``,
                                                        ``d_ff: moe_intermediate_size``, no gate)
``first_k_dense_replace``                               ``first_k_dense`` (dense width ``intermediate_size``)
``model.layers.{L..}`` (multi-token prediction)         ignored: not part of next-token logits
======================================================  ==============================================
"""

from __future__ import annotations

from typing import Any

from moesaic.interop.common import (
    Arch,
    body_rules,
    dense_mlp_rules,
    expert_rules,
    hf_field,
    llama_hf_fields,
    llama_model_fields,
    moe_features,
    moe_layers,
    per_layer_variants,
    refuse,
    register_archs,
    rope_scaling,
    rope_theta,
    shared_expert_rules,
)
from moesaic.interop.mapping import Layout, copy_rule

NAME = "deepseek_v3"


def to_moesaic(hf: Any) -> dict[str, Any]:
    if not hf_field(hf, "n_shared_experts"):
        refuse(NAME, "n_shared_experts", hf_field(hf, "n_shared_experts"), "DeepSeek-V3 blocks need >= 1 shared expert")
    cfg = llama_model_fields(hf, NAME)
    cfg["attention"] = {"kind": "mla", "num_heads": hf.num_attention_heads, "q_lora_rank": hf_field(hf, "q_lora_rank"),
                        "kv_lora_rank": hf.kv_lora_rank, "qk_nope_head_dim": hf.qk_nope_head_dim,
                        "qk_rope_head_dim": hf.qk_rope_head_dim, "v_head_dim": hf.v_head_dim,
                        "rope_theta": rope_theta(hf, NAME), "rope_scaling": rope_scaling(hf, NAME),
                        "rope_interleave": bool(hf_field(hf, "rope_interleave", True)),
                        "bias": bool(hf_field(hf, "attention_bias", False)), "latent_norm_eps": 1e-6}
    cfg["first_k_dense"] = int(hf_field(hf, "first_k_dense_replace", 0) or 0)
    cfg["moe"] = {
        "d_ff": hf.moe_intermediate_size, "num_experts": hf.n_routed_experts, "top_k": hf.num_experts_per_tok,
        "router": {"kind": "topk", "score_func": "sigmoid",
                   "normalization": "renorm" if hf_field(hf, "norm_topk_prob", True) else "none",
                   "n_groups": int(hf_field(hf, "n_group", 1) or 1),
                   "topk_groups": int(hf_field(hf, "topk_group", 1) or 1),
                   "routed_scaling_factor": float(hf.routed_scaling_factor), "expert_bias": True,
                   "aux_loss_coef": 0.0},
        "shared_experts": {"num": hf.n_shared_experts, "d_ff": hf.moe_intermediate_size,
                           "activation": cfg["activation"]}}
    return cfg


def unsupported(cfg: Any) -> list[str]:
    out = [f"{NAME} lacks {x}" for x in per_layer_variants(cfg, NAME)]
    a = cfg.attention
    if a.kind != "mla":
        out.append(f"{NAME} lacks attention kind {a.kind!r} (it has Multi-head Latent Attention only)")
    elif a.latent_norm_eps != 1e-6:
        out.append(f"{NAME} lacks latent_norm_eps != 1e-6")
    layers = moe_layers(cfg)
    if cfg.moe is None or layers != list(range(cfg.first_k_dense, cfg.num_layers)) or not layers:
        out.append(f"{NAME} lacks MoE layers other than all layers from first_k_dense on")
    else:
        out += moe_features(cfg.moe, arch=NAME, score="sigmoid", norms=("renorm", "none"), groups=True,
                            scaling=True, bias=True, shared=("plain",))
        if not getattr(cfg.moe.router, "expert_bias", False):
            out.append(f"{NAME} lacks a router without e_score_correction_bias")
        if cfg.moe.shared_experts.num == 0 or (cfg.moe.shared_experts.d_ff or cfg.moe.d_ff) != cfg.moe.d_ff:
            out.append(f"{NAME} lacks shared experts of a width other than moe_intermediate_size")
    return out


def to_hf(cfg: Any) -> dict[str, Any]:
    m, a = cfg.moe, cfg.attention
    out = llama_hf_fields(cfg)
    out.pop("head_dim")
    out.update(num_key_value_heads=a.num_heads, moe_intermediate_size=m.d_ff, n_routed_experts=m.num_experts,
               num_experts_per_tok=m.top_k, n_shared_experts=m.shared_experts.num,
               routed_scaling_factor=m.router.routed_scaling_factor, n_group=m.router.n_groups,
               topk_group=m.router.topk_groups, norm_topk_prob=m.router.normalization != "none",
               first_k_dense_replace=cfg.first_k_dense, q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank,
               qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim,
               rope_interleave=a.rope_interleave, attention_bias=a.bias)
    return out


def layout(hf: Any, expert_layout: str) -> Layout:
    bias = bool(hf_field(hf, "attention_bias", False))
    if hf_field(hf, "q_lora_rank") is None:
        attn = ["q_proj.weight"]
    else:
        attn = ["q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"] + (["q_a_proj.bias"] if bias else [])
    attn += ["kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"]
    attn += ["kv_a_proj_with_mqa.bias", "o_proj.bias"] if bias else []
    rules = body_rules(hf, attn)
    k = int(hf_field(hf, "first_k_dense_replace", 0) or 0)
    for i in range(hf.num_hidden_layers):
        if i < k:
            rules += dense_mlp_rules(i)
            continue
        p = f"model.layers.{i}.mlp."
        rules += expert_rules(i, hf.n_routed_experts, expert_layout)
        rules.append(copy_rule(p + "gate.e_score_correction_bias", p + "router.expert_bias"))
        rules += shared_expert_rules(i, "shared_experts")
    L = hf.num_hidden_layers
    mtp = r"^model\.layers\.(" + "|".join(str(L + j) for j in range(8)) + r")\."
    ignore = [(r"\.rotary_emb\.inv_freq$", "recomputed from rope_theta"),
              (mtp, "multi-token prediction modules (not used for next-token logits)")]
    return Layout(f"{NAME} ({expert_layout} experts)", rules, ignore)


register_archs(Arch(NAME, "deepseek_v3", "DeepseekV3ForCausalLM", to_moesaic, to_hf, unsupported, layout, rank=50))
