"""The Transformer body shared by the decoder LM and the encoder classifier, with Hugging Face Llama names.

``TransformerBody`` = ``embed_tokens`` -> ``layers.N`` (``input_layernorm``, ``self_attn``,
``post_attention_layernorm``, ``mlp``) -> ``norm``. ``mlp`` is a dense FFN (``gate_proj``/``up_proj``/
``down_proj``) or an :class:`~moesaic.moe.layer.MoELayer`, chosen per layer by ``moe``/``moe_every``/
``moe_offset``/``first_k_dense`` and ``layer_overrides`` (pre-norm residual blocks, Xiong et al. 2020).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.activations import Activation
from moesaic.core.config import ConfigError, Section, require, rule
from moesaic.models.attention import AttentionConfig
from moesaic.models.base import ModelConfig
from moesaic.models.cache import KVCache
from moesaic.models.masks import (
    attention_mask_4d,
    packed_mask_4d,
    positions_from_mask,
    positions_from_seq_ids,
)
from moesaic.models.norms import RMSNorm
from moesaic.models.rope import RotaryAngles
from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.layer import MoEConfig, MoELayer
from moesaic.moe.recompute import checkpointed


@dataclasses.dataclass
class LayerOverride(Section):
    """Settings for the listed layers that replace the model-wide ones (unset fields keep them)."""

    layers: list[int] = dataclasses.field(default_factory=list)
    dense: bool | None = None
    d_ff: int | None = rule(None, ge=1)
    moe: MoEConfig | None = None
    attention: AttentionConfig | None = None


@dataclasses.dataclass
class TransformerConfig(ModelConfig):
    """A stack of pre-norm blocks. ``moe: null`` is a dense model; otherwise layer i is MoE when
    ``i >= first_k_dense`` and ``i >= moe_offset`` and ``(i - moe_offset) % moe_every == 0``
    (Mixtral: every layer; Qwen2-MoE ``decoder_sparse_step=2``: ``moe_every: 2, moe_offset: 1``;
    DeepSeekMoE/V3: ``first_k_dense: 1``). ``vocab_size: null`` is filled from the data's tokenizer."""

    vocab_size: int | None = rule(None, ge=1)
    d_model: int = rule(64, ge=1)
    num_layers: int = rule(2, ge=1)
    d_ff: int = rule(128, ge=1)
    activation: Activation = "silu"
    gated: bool = True
    attention: AttentionConfig = dataclasses.field(default_factory=lambda: AttentionConfig.for_kind("mha"))
    moe: MoEConfig | None = None
    moe_every: int = rule(1, ge=1)
    moe_offset: int = rule(0, ge=0)
    first_k_dense: int = rule(0, ge=0)
    layer_overrides: list[LayerOverride] = dataclasses.field(default_factory=list)
    max_seq_len: int = rule(256, ge=1)
    rms_norm_eps: float = rule(1e-6, gt=0.0)
    init_std: float = rule(0.02, gt=0.0)
    activation_checkpointing: bool | list[int] = rule(
        False, doc="recompute blocks in backward instead of keeping their activations: true (every block) or a "
                   "list of block indices (moesaic.moe.recompute; docs/benchmarks.md)")

    def checkpointed_layer(self, i: int) -> bool:
        """Whether block ``i`` runs under activation checkpointing."""
        ac = self.activation_checkpointing
        return ac if isinstance(ac, bool) else i in ac

    def validate(self, path: str) -> None:
        self.attention.validate_model(f"{path}.attention", self.d_model)
        for j, ov in enumerate(self.layer_overrides):
            for i in ov.layers:
                require(0 <= i < self.num_layers, f"{path}.layer_overrides.{j}.layers", i,
                        f"must be a layer index in [0, {self.num_layers})")
            require(not (ov.moe is not None and ov.dense), f"{path}.layer_overrides.{j}.dense", ov.dense,
                    "cannot be true together with moe")
            if ov.attention is not None:
                ov.attention.validate_model(f"{path}.layer_overrides.{j}.attention", self.d_model)
        if not isinstance(self.activation_checkpointing, bool):
            for i in self.activation_checkpointing:
                require(0 <= i < self.num_layers, f"{path}.activation_checkpointing", i,
                        f"must list block indices in [0, {self.num_layers})")

    def layer_spec(self, i: int) -> tuple[AttentionConfig, MoEConfig | None, int]:
        """(attention config, MoE config or None for a dense FFN, dense FFN width) of layer ``i``."""
        moe = self.moe if (i >= self.first_k_dense and i >= self.moe_offset
                           and (i - self.moe_offset) % self.moe_every == 0) else None
        attn, d_ff = self.attention, self.d_ff
        for ov in self.layer_overrides:
            if i in ov.layers:
                attn = ov.attention or attn
                d_ff = ov.d_ff or d_ff
                if ov.moe is not None:
                    moe = ov.moe
                elif ov.dense is not None:
                    moe = None if ov.dense else (moe or self.moe)
        return attn, moe, d_ff

    def require_vocab(self, path: str = "model") -> int:
        if self.vocab_size is None:
            raise ConfigError(f"{path}.vocab_size", None, "must be set (the trainer fills it from the tokenizer)")
        return self.vocab_size


class TransformerLayer(nn.Module):
    """Pre-norm block: ``h += attn(norm(h)); h += mlp(norm(h))``."""

    def __init__(self, cfg: TransformerConfig, layer_idx: int, *, causal: bool):
        super().__init__()
        attn_cfg, moe_cfg, d_ff = cfg.layer_spec(layer_idx)
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.self_attn = attn_cfg.build(cfg.d_model, layer_idx, causal=causal, norm_eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp: nn.Module = (moe_cfg.build(cfg.d_model, causal=causal) if moe_cfg is not None
                               else DenseFFN(cfg.d_model, d_ff, cfg.activation, cfg.gated))

    def forward(self, h_BSD: Tensor, position_ids_BS: Tensor, mask_B1QK: Tensor | None, cache: KVCache | None,
                token_mask_BS: Tensor | None, input_ids_BS: Tensor | None, rope: RotaryAngles | None = None,
                **ctx: Any) -> Tensor:
        """``ctx``: extra routing inputs for the MoE layer (``task_id`` for task gates, ``domain_id``). ``rope``:
        the rotary angles of ``position_ids_BS`` shared by the layers of one forward, handed to attention kinds
        that take them (``accepts_rope``); the others compute their own."""
        x_BSD = self.input_layernorm(h_BSD)
        if rope is not None and getattr(self.self_attn, "accepts_rope", False):
            a_BSD = self.self_attn(x_BSD, position_ids_BS, mask_B1QK, cache, rope=rope)
        else:
            a_BSD = self.self_attn(x_BSD, position_ids_BS, mask_B1QK, cache)
        h_BSD = h_BSD + a_BSD
        x_BSD = self.post_attention_layernorm(h_BSD)
        if isinstance(self.mlp, MoELayer):
            y_BSD = self.mlp(x_BSD, mask=token_mask_BS, token_ids=input_ids_BS, **ctx)
        else:
            y_BSD = self.mlp(x_BSD)
        return h_BSD + y_BSD


class TransformerBody(nn.Module):
    """``embed_tokens`` -> layers -> final ``norm``; Hugging Face's ``LlamaModel``."""

    def __init__(self, cfg: TransformerConfig, *, causal: bool):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        self.embed_tokens = nn.Embedding(cfg.require_vocab(), cfg.d_model)
        self.layers = nn.ModuleList([TransformerLayer(cfg, i, causal=causal) for i in range(cfg.num_layers)])
        self.checkpoint_blocks = [cfg.checkpointed_layer(i) for i in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)

    def set_activation_checkpointing(self, blocks: bool | list[int]) -> None:
        """Checkpoint every block (True), none (False) or the listed ones, as the config key does."""
        self.cfg.activation_checkpointing = blocks
        self.cfg.validate("model")
        self.checkpoint_blocks = [self.cfg.checkpointed_layer(i) for i in range(len(self.layers))]

    def forward(self, input_ids_BS: Tensor, attention_mask_BK: Tensor | None = None,
                position_ids_BS: Tensor | None = None, cache: KVCache | None = None,
                seq_ids_BS: Tensor | None = None) -> Tensor:
        """``seq_ids_BS``: padding-free rows (:func:`moesaic.train.packing.pack`): the sequence of every token;
        attention stays within a sequence and positions restart at each sequence (no cache)."""
        B, S = input_ids_BS.shape
        if seq_ids_BS is not None:
            return self._packed(input_ids_BS, seq_ids_BS, attention_mask_BK, position_ids_BS, cache)
        past = cache.seq_len if cache is not None else 0
        if attention_mask_BK is not None:
            require(attention_mask_BK.shape == (B, past + S), "attention_mask", tuple(attention_mask_BK.shape),
                    f"must have shape [batch, past + new tokens] = [{B}, {past + S}]")
        elif cache is not None and cache.mask is not None:
            attention_mask_BK = torch.cat((cache.mask, torch.ones(B, S, dtype=torch.bool,
                                                                   device=cache.mask.device)), 1)
        if position_ids_BS is None:
            position_ids_BS = (positions_from_mask(attention_mask_BK, S) if attention_mask_BK is not None else
                               torch.arange(past, past + S, device=input_ids_BS.device).expand(B, S))
        mask_B1QK = attention_mask_4d(attention_mask_BK, B, S, past + S, self.causal, input_ids_BS.device)
        token_mask_BS = attention_mask_BK[:, -S:].bool() if attention_mask_BK is not None else None
        h_BSD = self.embed_tokens(input_ids_BS)
        rope = RotaryAngles(position_ids_BS)  # cos/sin computed once for all layers, not once per layer
        for layer, ckpt in zip(self.layers, self.checkpoint_blocks):
            if ckpt and cache is None and self.training:
                h_BSD = checkpointed(layer, functools.partial(layer, rope=rope), h_BSD, position_ids_BS, mask_B1QK,
                                     None, token_mask_BS, input_ids_BS)
            else:
                h_BSD = layer(h_BSD, position_ids_BS, mask_B1QK, cache, token_mask_BS, input_ids_BS, rope)
        if cache is not None:
            cache.advance(S, attention_mask_BK)
        return self.norm(h_BSD)

    def _packed(self, input_ids_BS: Tensor, seq_ids_BS: Tensor, attention_mask_BK: Tensor | None,
                position_ids_BS: Tensor | None, cache: KVCache | None) -> Tensor:
        require(cache is None, "seq_ids", "packed", "padding-free rows are for training and scoring, not cached "
                                                    "decoding")
        require(seq_ids_BS.shape == input_ids_BS.shape, "seq_ids", tuple(seq_ids_BS.shape),
                f"must have the shape of input_ids {tuple(input_ids_BS.shape)}")
        if position_ids_BS is None:
            position_ids_BS = positions_from_seq_ids(seq_ids_BS)
        mask_B1QK = packed_mask_4d(seq_ids_BS, self.causal)
        token_mask_BS = None
        if attention_mask_BK is not None:  # a padded tail after the packed sequences
            token_mask_BS = attention_mask_BK.bool()
            mask_B1QK = mask_B1QK & token_mask_BS[:, None, None, :]
            mask_B1QK = mask_B1QK | ~mask_B1QK.any(-1, keepdim=True)
        h_BSD = self.embed_tokens(input_ids_BS)
        rope = RotaryAngles(position_ids_BS)
        for layer in self.layers:
            h_BSD = layer(h_BSD, position_ids_BS, mask_B1QK, None, token_mask_BS, input_ids_BS, rope,
                          seq_ids_T=seq_ids_BS)
        return self.norm(h_BSD)


def init_weights(model: nn.Module, std: float) -> None:
    """Normal(0, std) for linear and embedding weights (zero biases), and for experts without their own
    ``init_std`` (Hugging Face's ``initializer_range`` convention); norms stay at one."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            bias = getattr(m, "bias", None)
            if bias is not None:
                nn.init.zeros_(bias)
        elif isinstance(m, MoELayer) and getattr(m.experts.cfg, "init_std", 1) is None:
            for p in m.experts.parameters():
                nn.init.normal_(p, std=std)
