"""BERT (``BertModel``, ``model_type: bert``) and DistilBERT (``DistilBertModel``, ``model_type: distilbert``).

Both import as a moesaic ``bert_encoder`` (:mod:`moesaic.models.bert`); task models (``BertForMaskedLM``,
``DistilBertForSequenceClassification``, ...) import their encoder, their heads are ignored.

==============================================  =====================================================
Hugging Face (BERT / DistilBERT)                 moesaic ``bert_encoder``
==============================================  =====================================================
``embeddings.{word,position,token_type}_emb..`` same names (DistilBERT: no token types)
``embeddings.LayerNorm``                         ``embeddings.norm``
``attention.self.{query,key,value}`` / ``q_lin`` ``layers.i.self_attn.{q,k,v}_proj``
``attention.output.dense`` / ``out_lin``         ``layers.i.self_attn.o_proj``
``attention.output.LayerNorm`` / ``sa_layer_..`` ``layers.i.attn_norm``
``intermediate.dense`` / ``ffn.lin1``            ``layers.i.mlp.up_proj``
``output.dense`` / ``ffn.lin2``                  ``layers.i.mlp.down_proj``
``output.LayerNorm`` / ``output_layer_norm``     ``layers.i.ffn_norm``
``pooler.dense`` (BERT, when saved)              ``pooler``
==============================================  =====================================================
"""

from __future__ import annotations

from typing import Any

from moesaic.interop.common import ACT_TO_HF, HF_TO_ACT, hf_field, refuse, register_archs
from moesaic.interop.common import activation as hf_activation
from moesaic.interop.hf_encoder import EncoderArch
from moesaic.interop.mapping import Layout, Rule, copy_rule

#: Buffers some checkpoints save; both are recomputed (``arange`` positions, all-zero token types).
IGNORE = [(r"^embeddings\.position_ids$", "recomputed (0..S-1)"),
          (r"^embeddings\.token_type_ids$", "all-zero default token types")]
BERT_HEADS = (r"^cls\.", r"^classifier\.", r"^qa_outputs\.")
DISTILBERT_HEADS = (r"^vocab_(transform|layer_norm|projector)\.", r"^pre_classifier\.", r"^classifier\.",
                    r"^qa_outputs\.")
#: DistilBERT's LayerNorms use this epsilon whatever the config says.
DISTILBERT_EPS = 1e-12


def _pair(hf: str, ms: str) -> list[Rule]:
    return [copy_rule(f"{hf}.weight", f"{ms}.weight"), copy_rule(f"{hf}.bias", f"{ms}.bias")]


def _embedding_rules(token_types: bool) -> list[Rule]:
    names = ["word_embeddings", "position_embeddings"] + (["token_type_embeddings"] if token_types else [])
    return [copy_rule(f"embeddings.{n}.weight") for n in names] + _pair("embeddings.LayerNorm", "embeddings.norm")


def _common(hf: Any, name: str, width: str, heads: str) -> None:
    if getattr(hf, width) % getattr(hf, heads):
        refuse(name, heads, getattr(hf, heads), f"must divide {width} ({getattr(hf, width)})")
    if hf_field(hf, "is_decoder", False) or hf_field(hf, "add_cross_attention", False):
        refuse(name, "is_decoder", True, "decoder / cross-attention BERT is not an encoder")
    pos = hf_field(hf, "position_embedding_type", "absolute")
    if pos not in (None, "absolute"):
        refuse(name, "position_embedding_type", pos, "only absolute position embeddings exist in bert_encoder")
    if hf_field(hf, "quantization_config", None):
        refuse(name, "quantization_config", "set", "dequantize the checkpoint first")


# -------------------------------------------------------------------------------------------------- BERT

def bert_to_moesaic(hf: Any) -> dict[str, Any]:
    _common(hf, "bert", "hidden_size", "num_attention_heads")
    return {"kind": "bert_encoder", "vocab_size": hf.vocab_size, "d_model": hf.hidden_size,
            "num_layers": hf.num_hidden_layers, "num_heads": hf.num_attention_heads,
            "d_ff": hf.intermediate_size, "activation": hf_activation(hf, "bert"),
            "max_position_embeddings": hf.max_position_embeddings, "type_vocab_size": hf.type_vocab_size,
            "layer_norm_eps": float(hf.layer_norm_eps), "pad_token_id": hf_field(hf, "pad_token_id"),
            "init_std": float(hf_field(hf, "initializer_range", 0.02) or 0.02)}


def bert_to_hf(cfg: Any) -> dict[str, Any]:
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.d_ff,
            "hidden_act": ACT_TO_HF[cfg.activation], "max_position_embeddings": cfg.max_position_embeddings,
            "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps,
            "pad_token_id": cfg.pad_token_id, "initializer_range": cfg.init_std}


def bert_unsupported(cfg: Any) -> list[str]:
    return ["type_vocab_size = 0 (BERT always has token type embeddings)"] if cfg.type_vocab_size == 0 else []


def bert_layout(hf: Any, pooler: bool) -> Layout:
    rules = _embedding_rules(True)
    for i in range(hf.num_hidden_layers):
        p, m = f"encoder.layer.{i}.", f"layers.{i}."
        rules += _pair(p + "attention.self.query", m + "self_attn.q_proj")
        rules += _pair(p + "attention.self.key", m + "self_attn.k_proj")
        rules += _pair(p + "attention.self.value", m + "self_attn.v_proj")
        rules += _pair(p + "attention.output.dense", m + "self_attn.o_proj")
        rules += _pair(p + "attention.output.LayerNorm", m + "attn_norm")
        rules += _pair(p + "intermediate.dense", m + "mlp.up_proj")
        rules += _pair(p + "output.dense", m + "mlp.down_proj")
        rules += _pair(p + "output.LayerNorm", m + "ffn_norm")
    if pooler:
        rules += _pair("pooler.dense", "pooler")
    return Layout("bert" + (" with pooler" if pooler else ""), rules, list(IGNORE))


def bert_shapes(hf: Any) -> list[tuple[str, int, str, int]]:
    return [("vocab_size", hf.vocab_size, "embeddings.word_embeddings.weight", 0),
            ("hidden_size", hf.hidden_size, "embeddings.word_embeddings.weight", 1),
            ("max_position_embeddings", hf.max_position_embeddings, "embeddings.position_embeddings.weight", 0),
            ("type_vocab_size", hf.type_vocab_size, "embeddings.token_type_embeddings.weight", 0),
            ("intermediate_size", hf.intermediate_size, "encoder.layer.0.intermediate.dense.weight", 0)]


# -------------------------------------------------------------------------------------------- DistilBERT

def distilbert_to_moesaic(hf: Any) -> dict[str, Any]:
    _common(hf, "distilbert", "dim", "n_heads")
    act = hf_field(hf, "activation", "gelu")
    if act not in HF_TO_ACT:
        refuse("distilbert", "activation", act, f"known: {', '.join(HF_TO_ACT)}")
    return {"kind": "bert_encoder", "vocab_size": hf.vocab_size, "d_model": hf.dim, "num_layers": hf.n_layers,
            "num_heads": hf.n_heads, "d_ff": hf.hidden_dim,
            "activation": HF_TO_ACT[act],
            "max_position_embeddings": hf.max_position_embeddings, "type_vocab_size": 0,
            "layer_norm_eps": DISTILBERT_EPS, "pad_token_id": hf_field(hf, "pad_token_id"),
            "init_std": float(hf_field(hf, "initializer_range", 0.02) or 0.02)}


def distilbert_to_hf(cfg: Any) -> dict[str, Any]:
    return {"vocab_size": cfg.vocab_size, "dim": cfg.d_model, "n_layers": cfg.num_layers, "n_heads": cfg.num_heads,
            "hidden_dim": cfg.d_ff, "activation": ACT_TO_HF[cfg.activation],
            "max_position_embeddings": cfg.max_position_embeddings, "pad_token_id": cfg.pad_token_id,
            "initializer_range": cfg.init_std, "sinusoidal_pos_embds": False}


def distilbert_unsupported(cfg: Any) -> list[str]:
    out = []
    if cfg.type_vocab_size != 0:
        out.append(f"token type embeddings (type_vocab_size = {cfg.type_vocab_size})")
    if cfg.layer_norm_eps != DISTILBERT_EPS:
        out.append(f"layer_norm_eps = {cfg.layer_norm_eps} (DistilBERT fixes {DISTILBERT_EPS})")
    if cfg.pooler:
        out.append("a pooler")
    return out


def distilbert_layout(hf: Any, pooler: bool) -> Layout:
    rules = _embedding_rules(False)
    for i in range(hf.n_layers):
        p, m = f"transformer.layer.{i}.", f"layers.{i}."
        for hf_name, ms in (("q_lin", "q_proj"), ("k_lin", "k_proj"), ("v_lin", "v_proj"), ("out_lin", "o_proj")):
            rules += _pair(p + "attention." + hf_name, m + "self_attn." + ms)
        rules += _pair(p + "sa_layer_norm", m + "attn_norm")
        rules += _pair(p + "ffn.lin1", m + "mlp.up_proj")
        rules += _pair(p + "ffn.lin2", m + "mlp.down_proj")
        rules += _pair(p + "output_layer_norm", m + "ffn_norm")
    return Layout("distilbert", rules, list(IGNORE))


def distilbert_shapes(hf: Any) -> list[tuple[str, int, str, int]]:
    return [("vocab_size", hf.vocab_size, "embeddings.word_embeddings.weight", 0),
            ("dim", hf.dim, "embeddings.word_embeddings.weight", 1),
            ("max_position_embeddings", hf.max_position_embeddings, "embeddings.position_embeddings.weight", 0),
            ("hidden_dim", hf.hidden_dim, "transformer.layer.0.ffn.lin1.weight", 0)]


register_archs(
    EncoderArch("bert", "bert", "BertModel", bert_to_moesaic, bert_to_hf, bert_unsupported,
                lambda hf, xl: bert_layout(hf, True), rank=10, prefix="bert.",
                pooler_keys=("pooler.dense.weight", "pooler.dense.bias"), heads=BERT_HEADS,
                encoder_layout=bert_layout, shape_fields=bert_shapes,
                auto_kwargs=lambda pooler: {"add_pooling_layer": pooler}),
    EncoderArch("distilbert", "distilbert", "DistilBertModel", distilbert_to_moesaic, distilbert_to_hf,
                distilbert_unsupported, lambda hf, xl: distilbert_layout(hf, False), rank=20, prefix="distilbert.",
                heads=DISTILBERT_HEADS, encoder_layout=distilbert_layout, shape_fields=distilbert_shapes)
)
