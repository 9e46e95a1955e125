"""Dense Llama (``LlamaForCausalLM``), Mistral (``MistralForCausalLM``) and Qwen2 (``Qwen2ForCausalLM``).

They import as dense moesaic ``decoder_lm`` models (``moe: null``), the starting point of upcycling. All
names are kept (``model.layers.i.mlp.{gate,up,down}_proj`` is moesaic's dense FFN).

=========================  ======================================================================
Hugging Face               moesaic ``decoder_lm``
=========================  ======================================================================
Llama ``attention_bias``   ``attention.bias`` and ``o_bias`` (``mlp_bias`` is refused)
Mistral ``sliding_window`` ``attention.sliding_window``
Qwen2 q/k/v biases         ``attention.bias: true`` (no ``o_proj`` bias); ``use_sliding_window`` refused
=========================  ======================================================================
"""

from __future__ import annotations

from typing import Any

from moesaic.interop.common import (
    Arch,
    attention_fields,
    body_rules,
    dense_mlp_rules,
    hf_field,
    llama_hf_fields,
    llama_model_fields,
    mha_names,
    per_layer_variants,
    refuse,
    register_archs,
)
from moesaic.interop.mapping import Layout

IGNORE = [(r"\.rotary_emb\.inv_freq$", "recomputed from rope_theta")]


def _to_moesaic(hf: Any, name: str) -> dict[str, Any]:
    cfg = llama_model_fields(hf, name)
    if name == "llama":
        if hf_field(hf, "mlp_bias", False):
            refuse(name, "mlp_bias", True, "moesaic FFNs have no biases")
        bias = bool(hf_field(hf, "attention_bias", False))
        cfg["attention"] = attention_fields(hf, name, bias=bias, o_bias=bias)
    elif name == "mistral":
        cfg["attention"] = attention_fields(hf, name, sliding_window=hf_field(hf, "sliding_window"))
    else:
        if hf_field(hf, "use_sliding_window", False):
            refuse(name, "use_sliding_window", True, "per-layer sliding windows (layer_types) are not supported")
        cfg["attention"] = attention_fields(hf, name, bias=True)
    cfg["moe"] = None
    return cfg


def _unsupported(cfg: Any, name: str) -> list[str]:
    out = [f"{name} lacks {x}" for x in per_layer_variants(cfg, name)]
    if cfg.moe is not None:
        out.append(f"{name} lacks MoE layers (dense architecture)")
    a = cfg.attention
    if a.kind != "mha" or a.qk_norm:
        out.append(f"{name} lacks attention {a.kind!r} with q/k norm")
        return out
    want = {"llama": (a.bias, a.bias, None), "mistral": (False, False, a.sliding_window), "qwen2": (True, False, None)}
    if (a.bias, a.o_bias, a.sliding_window) != want[name]:
        out.append(f"{name} lacks attention bias={a.bias}, o_bias={a.o_bias}, sliding_window={a.sliding_window}")
    return out


def _to_hf(cfg: Any, name: str) -> dict[str, Any]:
    out = llama_hf_fields(cfg)
    if name == "llama":
        out.update(attention_bias=cfg.attention.bias, mlp_bias=False)
    elif name == "mistral":
        out.update(sliding_window=cfg.attention.sliding_window)
    else:
        out.update(use_sliding_window=False)
    return out


def _layout(hf: Any, name: str) -> Layout:
    if name == "llama":
        b = bool(hf_field(hf, "attention_bias", False))
        names = mha_names(qkv_bias=b, o_bias=b)
    else:
        names = mha_names(qkv_bias=name == "qwen2")
    rules = body_rules(hf, names)
    for i in range(hf.num_hidden_layers):
        rules += dense_mlp_rules(i)
    return Layout(name, rules, IGNORE)


def _arch(name: str, hf_class: str, rank: int) -> Arch:
    return Arch(name, name, hf_class, lambda hf: _to_moesaic(hf, name), lambda cfg: _to_hf(cfg, name),
                lambda cfg: _unsupported(cfg, name), lambda hf, xl: _layout(hf, name), rank=rank)


register_archs(_arch("llama", "LlamaForCausalLM", 10), _arch("mistral", "MistralForCausalLM", 20),
               _arch("qwen2", "Qwen2ForCausalLM", 30))
