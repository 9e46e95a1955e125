"""BERT-family bidirectional encoder (``model: {kind: bert_encoder}``): BERT, DistilBERT, MiniLM.

Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding";
Sanh et al. 2019, "DistilBERT". Unlike :mod:`moesaic.models.encoder` (RoPE, RMSNorm, pre-norm), this is
the original layout that pretrained BERT checkpoints need: learned absolute position embeddings, token
type (segment) embeddings, LayerNorm with bias, post-norm residual blocks (``h = norm(h + f(h))``),
biased projections and an ungated FFN (exact erf GELU for ``gelu``). ``forward`` returns
:class:`EncoderOutput` whose ``last_hidden_state`` matches transformers' ``BertModel`` /
``DistilBertModel`` (docs/hf.md, "BERT-family encoders"). The FFN of every block sits in ``mlp`` (a
:class:`~moesaic.moe.dense_ffn.DenseFFN` with biases), the slot that upcycling replaces.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.core.activations import Activation
from moesaic.core.config import ConfigError, require, rule
from moesaic.models.base import MODELS, ModelConfig
from moesaic.models.masks import attention_mask_4d
from moesaic.moe.dense_ffn import DenseFFN


@dataclasses.dataclass
class BertEncoderConfig(ModelConfig):
    """``type_vocab_size: 0`` drops the token type embeddings (DistilBERT); ``pooler`` keeps BERT's
    ``tanh(W h[CLS] + b)`` head so a checkpoint that has one round-trips."""

    vocab_size: int = rule(30522, ge=1)
    d_model: int = rule(64, ge=1)
    num_layers: int = rule(2, ge=1)
    num_heads: int = rule(4, ge=1)
    d_ff: int = rule(128, ge=1)
    activation: Activation = "gelu"
    max_position_embeddings: int = rule(512, ge=1)
    type_vocab_size: int = rule(2, ge=0)
    layer_norm_eps: float = rule(1e-12, gt=0.0)
    pad_token_id: int | None = rule(0, ge=0)
    pooler: bool = False
    init_std: float = rule(0.02, gt=0.0)

    def validate(self, path: str) -> None:
        require(self.d_model % self.num_heads == 0, f"{path}.num_heads", self.num_heads,
                f"must divide d_model ({self.d_model})")
        if self.pad_token_id is not None:
            require(self.pad_token_id < self.vocab_size, f"{path}.pad_token_id", self.pad_token_id,
                    f"must be a token id below vocab_size ({self.vocab_size})")


@dataclasses.dataclass
class EncoderOutput:
    """``last_hidden_state`` ``[B, S, D]`` (every position, padding included); ``pooler_output`` ``[B, D]``
    when the model has a pooler (transformers' ``BaseModelOutputWithPooling`` names)."""

    last_hidden_state: Tensor
    pooler_output: Tensor | None = None


class BertEmbeddings(nn.Module):
    """``norm(word + position + token_type)``."""

    def __init__(self, cfg: BertEncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.d_model)
        self.token_type_embeddings = (nn.Embedding(cfg.type_vocab_size, cfg.d_model)
                                      if cfg.type_vocab_size > 0 else None)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, input_ids_BS: Tensor, token_type_ids_BS: Tensor | None, position_ids_BS: Tensor) -> Tensor:
        h_BSD = self.word_embeddings(input_ids_BS)
        if self.token_type_embeddings is not None:
            if token_type_ids_BS is None:
                token_type_ids_BS = torch.zeros_like(input_ids_BS)
            h_BSD = h_BSD + self.token_type_embeddings(token_type_ids_BS)
        h_BSD = h_BSD + self.position_embeddings(position_ids_BS)
        return self.norm(h_BSD)


class BertSelfAttention(nn.Module):
    """Multi-head attention with biased ``q/k/v/o_proj`` and no positional rotation (positions are
    already in the embeddings), through :func:`torch.nn.functional.scaled_dot_product_attention`."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def forward(self, x_BSD: Tensor, mask_B1QK: Tensor | None) -> Tensor:
        B, S, D = x_BSD.shape
        H, d = self.num_heads, self.head_dim
        q_BHSd = self.q_proj(x_BSD).view(B, S, H, d).transpose(1, 2)
        k_BHSd = self.k_proj(x_BSD).view(B, S, H, d).transpose(1, 2)
        v_BHSd = self.v_proj(x_BSD).view(B, S, H, d).transpose(1, 2)
        o_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BHSd, v_BHSd, attn_mask=mask_B1QK)
        return self.o_proj(o_BHSd.transpose(1, 2).reshape(B, S, D))


class BertLayer(nn.Module):
    """Post-norm block: ``h = attn_norm(h + attn(h)); h = ffn_norm(h + mlp(h))``."""

    def __init__(self, cfg: BertEncoderConfig):
        super().__init__()
        self.self_attn = BertSelfAttention(cfg.d_model, cfg.num_heads)
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp: nn.Module = DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation, gated=False, bias=True)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, h_BSD: Tensor, mask_B1QK: Tensor | None, **ffn_kw: Any) -> Tensor:
        """``ffn_kw``: keywords of the FFN slot (an MoE layer's padding ``mask`` and routing context)."""
        h_BSD = self.attn_norm(h_BSD + self.self_attn(h_BSD, mask_B1QK))
        return self.ffn_norm(h_BSD + self.mlp(h_BSD, **ffn_kw))


@MODELS.register("bert_encoder")
class BertEncoder(nn.Module):
    """BERT-family encoder: absolute positions, token types, post-norm blocks; ``.last_hidden_state``."""

    Config = BertEncoderConfig
    #: Where an imported model came from (set by ``interop.hf.from_hf``).
    hf_info: dict[str, Any]

    def __init__(self, cfg: BertEncoderConfig, **kw: Any):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_layers)])
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if cfg.pooler else None
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Normal(0, init_std) weights, zero biases, unit LayerNorms (BERT's initialisation)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, return_dict: bool = True, **ffn_kw: Any) -> EncoderOutput | Tensor:
        """``attention_mask`` ``[B, S]``: 1 for real tokens; padding keys are never attended to (padding
        queries still get an output, as in transformers). ``position_ids`` default to ``0..S-1`` per row
        (BERT pads on the right). ``return_dict=False`` returns ``last_hidden_state``. ``ffn_kw`` go to every FFN
        slot (MoE FFNs: :mod:`moesaic.models.sentence`)."""
        B, S = input_ids.shape
        if S > self.cfg.max_position_embeddings:
            raise ConfigError("input_ids.shape[1]", S, f"must be at most max_position_embeddings "
                              f"({self.cfg.max_position_embeddings})")
        if token_type_ids is not None:
            if self.cfg.type_vocab_size == 0:
                raise ConfigError("token_type_ids", "given", "this model has no token type embeddings "
                                  "(type_vocab_size = 0, DistilBERT-shaped)", show_value=False)
            require(token_type_ids.shape == (B, S), "token_type_ids", tuple(token_type_ids.shape),
                    f"must have the shape of input_ids ({B}, {S})")
        if attention_mask is not None:
            require(attention_mask.shape == (B, S), "attention_mask", tuple(attention_mask.shape),
                    f"must have the shape of input_ids ({B}, {S})")
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
        mask_B1QK = attention_mask_4d(attention_mask, B, S, S, False, input_ids.device)
        h_BSD = self.embeddings(input_ids, token_type_ids, position_ids)
        for layer in self.layers:
            h_BSD = layer(h_BSD, mask_B1QK, **ffn_kw)
        if not return_dict:
            return h_BSD
        pooled_BD = torch.tanh(self.pooler(h_BSD[:, 0])) if self.pooler is not None else None
        return EncoderOutput(h_BSD, pooled_BD)
