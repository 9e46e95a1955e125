"""Pieces shared by the architecture files: the Llama-family config fields, weight rules and feature checks.

Every architecture in ``interop/arch_*.py`` is an :class:`Arch`, registered in
:data:`~moesaic.interop.common.HF_ARCHITECTURES` by :func:`register_archs`: the ``model_type`` it reads, the
transformers class it writes, ``to_moesaic(hf_config) -> model config dict``, ``to_hf(model_cfg) -> HF
config fields`` (after ``unsupported(model_cfg)`` found nothing missing) and ``layout(hf_config,
expert_layout) -> Layout``. Fields that change the math and that moesaic cannot express are refused by
name (:func:`refuse`), never dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import torch
from torch import nn

from moesaic.core.config import ConfigError, parse, validate_tree
from moesaic.core.errors import ConversionError
from moesaic.core.registry import Registry
from moesaic.interop.mapping import Layout, Rule, StackExperts, StackGatedExperts, copy_rule

HF_ARCHITECTURES: Registry[Arch] = Registry(
    "HF architecture", "moesaic.interop", base="moesaic.interop.common:Arch", prefix="arch_")

#: Expert weight layouts on disk. ``per_expert``: one ``[out, in]`` matrix per expert and projection, the
#: layout of every Hub checkpoint and of ``save_pretrained`` (transformers 4 and 5). ``fused``: the
#: in-memory layout of transformers 5 (``experts.gate_up_proj [E, 2F, D]``, ``experts.down_proj [E, D, F]``),
#: written by ``save_pretrained(save_original_format=False)``.
EXPERT_LAYOUTS = ("per_expert", "fused")

HF_TO_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_new": "gelu_tanh", "relu": "relu"}
ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    model_type: str
    hf_class: str
    to_moesaic: Callable[[Any], dict[str, Any]]
    to_hf: Callable[[Any], dict[str, Any]]
    unsupported: Callable[[Any], list[str]]
    layout: Callable[[Any, str], Layout]
    #: Preference when several architectures can hold a model (lower first).
    rank: int = 50
    #: The moesaic model kind this architecture imports into and exports from.
    kind: str = "decoder_lm"


def register_archs(*archs: Arch) -> None:
    """Register each architecture under its name, described by the transformers class it reads and writes."""
    for a in archs:
        HF_ARCHITECTURES.add(a.name, a, doc=f"{a.hf_class} (model_type {a.model_type!r})")


def refuse(arch: str, field: str, value: Any, why: str) -> NoReturn:
    raise ConversionError(f"{arch}: config field {field} = {value!r} is not supported: {why}")


def hf_field(hf: Any, name: str, default: Any = None) -> Any:
    """The field ``name`` of a Hugging Face config, or ``default`` where this transformers version lacks it."""
    return getattr(hf, name, default)


_SCALING_KEYS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                 "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                          "mscale_all_dim", "attention_factor", "truncate")}


def rope_theta(hf: Any, arch: str) -> float:
    rp = hf_field(hf, "rope_parameters") or {}
    theta = rp.get("rope_theta", hf_field(hf, "rope_theta"))
    if theta is None:
        refuse(arch, "rope_parameters.rope_theta", None, "missing")
    return float(theta)


def rope_scaling(hf: Any, arch: str) -> dict[str, Any] | None:
    """``attention.rope_scaling`` for the config's ``rope_parameters`` (None for plain RoPE)."""
    rp = dict(hf_field(hf, "rope_parameters") or {})
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(arch, "rope_parameters.partial_rotary_factor", rp["partial_rotary_factor"], "partial RoPE")
    if rtype == "default":
        return None
    if not isinstance(rtype, str) or rtype not in _SCALING_KEYS:
        refuse(arch, "rope_parameters.rope_type", rtype, f"supported: default, {', '.join(_SCALING_KEYS)}")
    out = {"type": rtype, **{k: rp[k] for k in _SCALING_KEYS[rtype] if rp.get(k) is not None}}
    if rtype == "yarn" and out.get("factor") is None:
        out["factor"] = hf.max_position_embeddings / rp["original_max_position_embeddings"]
    for k in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "attention_factor"):
        if k in out:
            out[k] = float(out[k])
    return out


def rope_parameters(a: Any) -> dict[str, Any]:
    """HF ``rope_parameters`` of a moesaic attention config."""
    sc = a.rope_scaling
    if sc is None or sc.type == "none":
        return {"rope_type": "default", "rope_theta": a.rope_theta}
    out = {"rope_type": sc.type, "rope_theta": a.rope_theta}
    out.update({k: getattr(sc, k) for k in _SCALING_KEYS[sc.type] if getattr(sc, k) is not None})
    return out


def activation(hf: Any, arch: str) -> str:
    act = hf_field(hf, "hidden_act", "silu")
    if act not in HF_TO_ACT:
        refuse(arch, "hidden_act", act, f"known: {', '.join(HF_TO_ACT)}")
    return HF_TO_ACT[act]


def head_dim(hf: Any) -> int:
    return hf_field(hf, "head_dim") or hf.hidden_size // hf.num_attention_heads


def llama_model_fields(hf: Any, arch: str, *, d_ff: int | None = None) -> dict[str, Any]:
    """The decoder fields every Llama-family config has."""
    if hf_field(hf, "attention_dropout", 0.0):
        pass  # dropout does not change inference; training with it is the trainer's choice
    return {
        "kind": "decoder_lm", "vocab_size": hf.vocab_size, "d_model": hf.hidden_size,
        "num_layers": hf.num_hidden_layers, "d_ff": d_ff if d_ff is not None else hf.intermediate_size,
        "activation": activation(hf, arch), "gated": True,
        "max_seq_len": hf_field(hf, "max_position_embeddings") or 2048, "rms_norm_eps": float(hf.rms_norm_eps),
        "tie_word_embeddings": bool(hf_field(hf, "tie_word_embeddings", False)),
        "init_std": float(hf_field(hf, "initializer_range", 0.02) or 0.02),
    }


def attention_fields(hf: Any, arch: str, **extra: Any) -> dict[str, Any]:
    """The moesaic ``attention`` section (multi-head, grouped KV, RoPE) of a Llama-family HF config."""
    return {"kind": "mha", "num_heads": hf.num_attention_heads,
            "num_key_value_heads": hf_field(hf, "num_key_value_heads") or hf.num_attention_heads,
            "head_dim": head_dim(hf), "rope_theta": rope_theta(hf, arch), "rope_scaling": rope_scaling(hf, arch),
            **extra}


def llama_hf_fields(cfg: Any) -> dict[str, Any]:
    """HF config fields of the Llama family from a moesaic decoder config."""
    a = cfg.attention
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
        "intermediate_size": cfg.d_ff, "hidden_act": ACT_TO_HF[cfg.activation],
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "initializer_range": cfg.init_std,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": getattr(a, "num_key_value_heads", None) or a.num_heads,
        "head_dim": a.head_dim or cfg.d_model // a.num_heads,
        "rope_parameters": rope_parameters(a),
    }


# ------------------------------------------------------------------------------------------ weight rules

def body_rules(hf: Any, attn_names: list[str]) -> list[Rule]:
    """Embeddings, final norm, head, per-layer norms and the attention tensors named ``attn_names``."""
    rules = [copy_rule("model.embed_tokens.weight"), copy_rule("model.norm.weight")]
    if not hf_field(hf, "tie_word_embeddings", False):
        rules.append(copy_rule("lm_head.weight"))
    for i in range(hf.num_hidden_layers):
        p = f"model.layers.{i}."
        rules += [copy_rule(p + "input_layernorm.weight"), copy_rule(p + "post_attention_layernorm.weight")]
        rules += [copy_rule(p + "self_attn." + n) for n in attn_names]
    return rules


def mha_names(*, qkv_bias: bool = False, o_bias: bool = False, qk_norm: bool = False) -> list[str]:
    names = [f"{p}_proj.weight" for p in "qkvo"]
    names += [f"{p}_proj.bias" for p in "qkv"] if qkv_bias else []
    names += ["o_proj.bias"] if o_bias else []
    names += ["q_norm.weight", "k_norm.weight"] if qk_norm else []
    return names


def dense_mlp_rules(i: int, prefix: str = "mlp") -> list[Rule]:
    p = f"model.layers.{i}.{prefix}."
    return [copy_rule(p + f"{n}_proj.weight", f"model.layers.{i}.mlp.{n}_proj.weight") for n in ("gate", "up", "down")]


def expert_rules(i: int, E: int, expert_layout: str, *, legacy_block: str = "mlp",
                 legacy_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                 router: str = "gate.weight") -> list[Rule]:
    """Router and routed experts of layer ``i`` in the declared ``expert_layout``.

    ``per_expert``: ``model.layers.{i}.{legacy_block}.experts.{e}.{gate|up|down}.weight`` (Mixtral calls the
    block ``block_sparse_moe`` and the projections ``w1``/``w3``/``w2``). ``fused``: transformers 5's
    ``model.layers.{i}.mlp.experts.gate_up_proj`` / ``down_proj``, stored exactly like moesaic's
    ``w_up_EHD`` / ``w_down_EDF``.
    """
    ms = f"model.layers.{i}.mlp."
    if expert_layout == "fused":
        hp = f"model.layers.{i}.mlp."
        return [copy_rule(hp + router, ms + "router.weight"),
                copy_rule(hp + "experts.gate_up_proj", ms + "experts.w_up_EHD"),
                copy_rule(hp + "experts.down_proj", ms + "experts.w_down_EDF")]
    if expert_layout != "per_expert":
        raise ConversionError(f"expert_layout = {expert_layout!r}: must be one of {', '.join(EXPERT_LAYOUTS)}")
    hp = f"model.layers.{i}.{legacy_block}."
    gate, up, down = legacy_names
    ex = [hp + f"experts.{{e}}.{n}.weight" for n in (gate, up, down)]
    return [copy_rule(hp + router, ms + "router.weight"),
            Rule(tuple(ex[0].format(e=e) for e in range(E)) + tuple(ex[1].format(e=e) for e in range(E)),
                 ms + "experts.w_up_EHD", StackGatedExperts(E)),
            Rule(tuple(ex[2].format(e=e) for e in range(E)), ms + "experts.w_down_EDF", StackExperts(E))]


def shared_expert_rules(i: int, hf_name: str) -> list[Rule]:
    p = f"model.layers.{i}.mlp."
    return [copy_rule(p + f"{hf_name}.{n}_proj.weight", p + f"shared_experts.{n}_proj.weight")
            for n in ("gate", "up", "down")]


# --------------------------------------------------------------------------------- feature inspection

def moe_layers(cfg: Any) -> list[int]:
    return [i for i in range(cfg.num_layers) if cfg.layer_spec(i)[1] is not None]


def per_layer_variants(cfg: Any, arch: str) -> list[str]:
    """Features that no Llama-family HF config can express: per-layer attention or MoE variants."""
    out = []
    for j, ov in enumerate(cfg.layer_overrides):
        if ov.attention is not None:
            out.append(f"layer_overrides.{j}.attention (per-layer attention settings)")
        if ov.moe is not None:
            out.append(f"layer_overrides.{j}.moe (per-layer MoE settings)")
        if ov.d_ff is not None and ov.d_ff != cfg.d_ff:
            out.append(f"layer_overrides.{j}.d_ff (per-layer dense width)")
    if not cfg.gated or cfg.activation not in ACT_TO_HF:
        out.append(f"activation {cfg.activation!r} gated={cfg.gated} (HF Llama-family FFNs are gated)")
    return out


def moe_features(moe: Any, *, arch: str, score: str = "softmax", norms: tuple[str, ...] = ("renorm",),
                 groups: bool = False, scaling: bool = False, bias: bool = False,
                 shared: tuple[str, ...] = ()) -> list[str]:
    """What ``moe`` uses that this architecture's MoE block lacks (empty list: it fits)."""
    out = []
    r = moe.router
    if r.kind != "topk":
        return [f"moe.router.kind {r.kind!r} (only token-choice top-k routing exists in HF)"]
    if moe.granularity != 1:
        out.append("moe.granularity != 1 (export the segmented experts by setting num_experts/d_ff instead)")
    if moe.dispatcher.kind != "sort":
        out.append(f"moe.dispatcher {moe.dispatcher.kind!r} (HF experts are dropless)")
    if moe.experts.kind != "glu" or moe.experts.activation not in ACT_TO_HF:
        out.append(f"moe.experts {moe.experts.kind!r} (HF experts are gated FFNs)")
    if r.score_func != score:
        out.append(f"moe.router.score_func {r.score_func!r}")
    norm = "renorm" if r.normalization == "softmax_topk" else r.normalization
    if norm not in norms:
        out.append(f"moe.router.normalization {r.normalization!r}")
    if (r.n_groups > 1) and not groups:
        out.append("moe.router.n_groups > 1 (group-limited routing)")
    if r.routed_scaling_factor != 1.0 and not scaling:
        out.append("moe.router.routed_scaling_factor != 1")
    if r.expert_bias and not bias:
        out.append("moe.router.expert_bias (aux-loss-free bias)")
    sh = moe.shared_experts
    if sh.num > 0:
        kind = "sigmoid" if sh.gate == "sigmoid" else "plain"
        if kind not in shared:
            out.append(f"moe.shared_experts with gate {sh.gate!r}")
        if sh.combine != "sum" or not sh.gated or sh.activation != moe.experts.activation:
            out.append("moe.shared_experts combine/activation other than a summed gated FFN")
    if not moe.mask_padding:
        pass  # only affects padding rows
    return [f"{arch} lacks {x}" for x in out]


M = TypeVar("M", bound=nn.Module)


def build_from_hf_config(arch: str, cls: type[M], cfg_cls: type, data: dict[str, Any], *, lazy: bool,
                         dtype: torch.dtype | None) -> M:
    """The moesaic model ``cls`` of the mapped config ``data`` (ConversionError when it does not validate);
    on the meta device when ``lazy`` (weights stay in their files until read), cast to ``dtype`` there."""
    try:
        cfg = validate_tree(parse(cfg_cls, data, "model"), "model")
    except ConfigError as e:
        raise ConversionError(f"{arch} config does not map to a valid moesaic model: {e}") from e
    if not lazy:
        return cls(cfg)
    with torch.device("meta"):
        model = cls(cfg)
    return model.to(dtype) if dtype is not None else model
