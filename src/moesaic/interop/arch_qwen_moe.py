"""Qwen2-MoE (``Qwen2MoeForCausalLM``; Qwen1.5-MoE) and Qwen3-MoE (``Qwen3MoeForCausalLM``).

=====================================================  ================================================
Hugging Face                                           moesaic ``decoder_lm``
=====================================================  ================================================
``model.layers.i.mlp.gate``                            ``...mlp.router`` (softmax top-k; ``norm_topk_prob``
                                                       -> ``normalization: renorm``, else ``none``)
``...mlp.experts.e.{gate,up}_proj``                    ``...mlp.experts.w_up_EHD[e]`` rows ``[:F]`` / ``[F:]``
``...mlp.experts.e.down_proj``                         ``...mlp.experts.w_down_EDF[e]``
``...mlp.shared_expert.*`` (Qwen2-MoE)                 ``...mlp.shared_experts.*`` (``num: 1``,
                                                       ``d_ff: shared_expert_intermediate_size``)
``...mlp.shared_expert_gate`` (Qwen2-MoE)              ``...mlp.shared_gate`` (``gate: sigmoid``)
``decoder_sparse_step`` s, ``mlp_only_layers``         ``moe_every: s``, ``moe_offset: s-1``, dense overrides
``qkv_bias`` (Qwen2-MoE) / ``attention_bias`` (Qwen3)  ``attention.bias`` (+ ``o_bias`` for Qwen3)
``self_attn.{q,k}_norm`` (Qwen3, per head)             ``attention.qk_norm: true, qk_norm_scope: head``
=====================================================  ================================================
Export writes ``decoder_sparse_step: moe_every`` when ``moe_offset == moe_every - 1`` and no
``first_k_dense`` (else 1) and lists the remaining dense layers in ``mlp_only_layers``.
"""

from __future__ import annotations

from typing import Any

from moesaic.interop.common import (
    Arch,
    attention_fields,
    body_rules,
    dense_mlp_rules,
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
    shared_expert_rules,
)
from moesaic.interop.mapping import Layout, copy_rule

IGNORE = [(r"\.rotary_emb\.inv_freq$", "recomputed from rope_theta")]


def hf_moe_layers(hf: Any) -> list[int]:
    step = hf_field(hf, "decoder_sparse_step", 1) or 1
    only = set(hf_field(hf, "mlp_only_layers", None) or [])
    return [i for i in range(hf.num_hidden_layers)
            if i not in only and hf.num_experts > 0 and (i + 1) % step == 0]


def _to_moesaic(hf: Any, name: str, qwen3: bool) -> dict[str, Any]:
    if hf_field(hf, "use_sliding_window", False) and not qwen3:
        refuse(name, "use_sliding_window", True, "per-layer sliding windows (layer_types) are not supported")
    cfg = llama_model_fields(hf, name)
    if qwen3:
        bias = bool(hf_field(hf, "attention_bias", False))
        window = hf_field(hf, "sliding_window") if hf_field(hf, "use_sliding_window") else None
        cfg["attention"] = attention_fields(hf, name, bias=bias, o_bias=bias, qk_norm=True, qk_norm_scope="head",
                               sliding_window=window)
    else:
        cfg["attention"] = attention_fields(hf, name, bias=bool(hf_field(hf, "qkv_bias", True)))
    step = hf_field(hf, "decoder_sparse_step", 1) or 1
    moe_set = set(hf_moe_layers(hf))
    cfg["moe_every"], cfg["moe_offset"] = step, step - 1
    dense = [i for i in range(hf.num_hidden_layers)
             if i not in moe_set and i >= step - 1 and (i - step + 1) % step == 0]
    cfg["layer_overrides"] = [{"layers": dense, "dense": True}] if dense else []
    router = {"kind": "topk", "score_func": "softmax",
              "normalization": "renorm" if hf_field(hf, "norm_topk_prob", False) else "none",
              "aux_loss_coef": float(hf_field(hf, "router_aux_loss_coef", 0.0))}
    moe = {"d_ff": hf.moe_intermediate_size, "num_experts": hf.num_experts, "top_k": hf.num_experts_per_tok,
           "router": router}
    if not qwen3:
        moe["shared_experts"] = {"num": 1, "d_ff": hf.shared_expert_intermediate_size, "gate": "sigmoid",
                                 "activation": cfg["activation"]}
    cfg["moe"] = moe if moe_set else None
    return cfg


def _unsupported(cfg: Any, name: str, qwen3: bool) -> list[str]:
    out = [f"{name} lacks {x}" for x in per_layer_variants(cfg, name)]
    a = cfg.attention
    if a.kind != "mha":
        out.append(f"{name} lacks attention kind {a.kind!r}")
    elif qwen3:
        if not a.qk_norm or a.qk_norm_scope != "head":
            out.append(f"{name} lacks attention without per-head q/k norm")
        if a.bias != a.o_bias:
            out.append(f"{name} lacks q/k/v bias without o bias (attention_bias covers all four)")
    else:
        if a.qk_norm or a.o_bias or a.sliding_window is not None:
            out.append(f"{name} lacks q/k norm, o_proj bias and sliding windows")
    if cfg.moe is None or not moe_layers(cfg):
        out.append(f"{name} lacks a model without MoE layers")
    else:
        shared = () if qwen3 else ("sigmoid",)
        out += moe_features(cfg.moe, arch=name, norms=("renorm", "none"), shared=shared)
        if not qwen3 and cfg.moe.shared_experts.num == 0:
            out.append(f"{name} lacks MoE blocks without a sigmoid-gated shared expert")
    return out


def _to_hf(cfg: Any, qwen3: bool) -> dict[str, Any]:
    m, a = cfg.moe, cfg.attention
    moe_set = set(moe_layers(cfg))
    step = cfg.moe_every if cfg.first_k_dense == 0 and cfg.moe_offset == cfg.moe_every - 1 else 1
    if any((i + 1) % step for i in moe_set):
        step = 1
    out = {**llama_hf_fields(cfg), "moe_intermediate_size": m.d_ff, "num_experts": m.num_experts,
           "num_experts_per_tok": m.top_k, "norm_topk_prob": m.router.normalization != "none",
           "decoder_sparse_step": step,
           "mlp_only_layers": [i for i in range(cfg.num_layers) if (i + 1) % step == 0 and i not in moe_set],
           "router_aux_loss_coef": m.router.aux_loss_coef}
    if qwen3:
        out.update(attention_bias=a.bias, use_sliding_window=a.sliding_window is not None,
                   sliding_window=a.sliding_window)
    else:
        sh = m.shared_experts
        out.update(qkv_bias=a.bias, shared_expert_intermediate_size=sh.num * (sh.d_ff or m.d_ff))
    return out


def _layout(hf: Any, expert_layout: str, name: str, qwen3: bool) -> Layout:
    bias = bool(hf_field(hf, "attention_bias", False)) if qwen3 else bool(hf_field(hf, "qkv_bias", True))
    rules = body_rules(hf, mha_names(qkv_bias=bias, o_bias=bias and qwen3, qk_norm=qwen3))
    moe_set = set(hf_moe_layers(hf))
    for i in range(hf.num_hidden_layers):
        if i not in moe_set:
            rules += dense_mlp_rules(i)
            continue
        rules += expert_rules(i, hf.num_experts, expert_layout)
        if not qwen3:
            p = f"model.layers.{i}.mlp."
            rules += shared_expert_rules(i, "shared_expert")
            rules.append(copy_rule(p + "shared_expert_gate.weight", p + "shared_gate.weight"))
    return Layout(f"{name} ({expert_layout} experts)", rules, IGNORE)


def _arch(name: str, model_type: str, hf_class: str, qwen3: bool, rank: int) -> Arch:
    return Arch(name, model_type, hf_class, lambda hf: _to_moesaic(hf, name, qwen3),
                lambda cfg: _to_hf(cfg, qwen3), lambda cfg: _unsupported(cfg, name, qwen3),
                lambda hf, xl: _layout(hf, xl, name, qwen3), rank=rank)


register_archs(_arch("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", False, 40),
               _arch("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", True, 20))
