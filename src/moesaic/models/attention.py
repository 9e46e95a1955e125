"""Attention blocks, chosen by ``attention: {kind: NAME}``; ``mha`` covers MHA, GQA and MQA.

Multi-head attention (Vaswani et al. 2017) with grouped-query attention (Ainslie et al. 2023,
``num_key_value_heads < num_heads``), RoPE, optional per-head q/k RMSNorm (Qwen3, OLMoE) and optional
projection biases (Qwen2). The math runs in :func:`torch.nn.functional.scaled_dot_product_attention`.
Parameter names follow Hugging Face Llama: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``q_norm``,
``k_norm``. Another attention kind (e.g. Multi-head Latent Attention) is one new file in ``models/``
registering into :data:`moesaic.models.attention.ATTENTIONS` with the same ``forward`` signature.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.core.config import ComponentConfig, require, rule
from moesaic.core.registry import Registry
from moesaic.core.split_linear import linear_call
from moesaic.models.cache import KVCache
from moesaic.models.masks import sliding_window_mask
from moesaic.models.norms import RMSNorm
from moesaic.models.rope import RotaryAngles, RotaryEmbedding, rotate
from moesaic.models.rope_scaling import RopeScalingConfig

ATTENTIONS: Registry[type[nn.Module]] = Registry(
    "attention", "moesaic.models", base="torch.nn:Module", default="mha")


@dataclasses.dataclass
class AttentionConfig(ComponentConfig):
    """Fields shared by attention kinds. ``head_dim`` defaults to ``d_model // num_heads``."""

    registry = ATTENTIONS
    num_heads: int = rule(4, ge=1)
    head_dim: int | None = rule(None, ge=1)
    rope_theta: float = rule(10000.0, gt=0.0)
    #: Long-context RoPE scaling (linear, llama3, yarn); null is plain RoPE.
    rope_scaling: RopeScalingConfig | None = None

    def validate_model(self, path: str, d_model: int) -> None:
        """Rules involving the model width; override and call super()."""
        if self.head_dim is None:
            require(d_model % self.num_heads == 0, f"{path}.num_heads", self.num_heads,
                    f"must divide d_model ({d_model}) when head_dim is not set")


@dataclasses.dataclass
class MHAConfig(AttentionConfig):
    num_key_value_heads: int | None = rule(None, ge=1)
    qk_norm: bool = False
    #: ``head``: RMSNorm over each head's ``head_dim`` (Qwen3); ``projection``: over the whole q / k
    #: projection before the head split (OLMoE).
    qk_norm_scope: Literal["head", "projection"] = "head"
    bias: bool = False
    o_bias: bool = False
    #: Each query sees at most this many most recent keys, itself included (Mistral, Mixtral).
    sliding_window: int | None = rule(None, ge=1)

    def validate(self, path: str) -> None:
        kv = self.num_key_value_heads or self.num_heads
        require(self.num_heads % kv == 0, f"{path}.num_key_value_heads", kv,
                f"must divide num_heads ({self.num_heads})")
        hd = self.head_dim
        require(hd is None or hd % 2 == 0, f"{path}.head_dim", hd, "must be even (RoPE rotates pairs)")


def repeat_kv(x_BHSd: Tensor, n_rep: int) -> Tensor:
    """``[B, Hkv, S, d] -> [B, Hkv * n_rep, S, d]``, each kv head repeated for its query group."""
    if n_rep == 1:
        return x_BHSd
    B, H, S, d = x_BHSd.shape
    return x_BHSd[:, :, None].expand(B, H, n_rep, S, d).reshape(B, H * n_rep, S, d)


@ATTENTIONS.register("mha")
class MultiHeadAttention(nn.Module):
    """Multi-head / grouped-query attention with RoPE through scaled_dot_product_attention."""

    Config = MHAConfig
    #: ``forward`` takes ``rope=`` (:class:`~moesaic.models.rope.RotaryAngles` shared by a forward's layers).
    accepts_rope = True

    def __init__(self, cfg: MHAConfig, d_model: int, layer_idx: int = 0, *, causal: bool = True,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.cfg, self.layer_idx, self.causal = cfg, layer_idx, causal
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_key_value_heads or cfg.num_heads
        self.head_dim = cfg.head_dim or d_model // cfg.num_heads
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(d_model, H * d, bias=cfg.bias)
        self.k_proj = nn.Linear(d_model, Hkv * d, bias=cfg.bias)
        self.v_proj = nn.Linear(d_model, Hkv * d, bias=cfg.bias)
        self.o_proj = nn.Linear(H * d, d_model, bias=cfg.o_bias)
        if cfg.qk_norm:
            whole = cfg.qk_norm_scope == "projection"
            self.q_norm = RMSNorm(H * d if whole else d, norm_eps)
            self.k_norm = RMSNorm(Hkv * d if whole else d, norm_eps)
        self.rotary_emb = RotaryEmbedding(d, cfg.rope_theta, cfg.rope_scaling)

    def forward(self, x_BSD: Tensor, position_ids_BS: Tensor, mask_B1QK: Tensor | None = None,
                cache: KVCache | None = None, rope: RotaryAngles | None = None) -> Tensor:
        """``rope``: the angles of ``position_ids_BS`` shared by the layers of one forward (else computed here)."""
        B, S, _ = x_BSD.shape
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k = linear_call(self.q_proj, x_BSD), linear_call(self.k_proj, x_BSD)
        if self.cfg.qk_norm and self.cfg.qk_norm_scope == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BSHd, k_BSHd = q.view(B, S, H, d), k.view(B, S, Hkv, d)
        v_BHSd = linear_call(self.v_proj, x_BSD).view(B, S, Hkv, d).transpose(1, 2)
        if self.cfg.qk_norm and self.cfg.qk_norm_scope == "head":
            q_BSHd, k_BSHd = self.q_norm(q_BSHd), self.k_norm(k_BSHd)
        cos, ssin = (rope or RotaryAngles(position_ids_BS)).rotation(self.rotary_emb, q_BSHd.dtype)
        q_BHSd = rotate(q_BSHd, cos, ssin).transpose(1, 2)  # = apply_rotary(q_BHSd, cos, sin), bit for bit
        k_BHSd = rotate(k_BSHd, cos, ssin).transpose(1, 2)
        if cache is not None:
            k_BHSd, v_BHSd = cache.update(self.layer_idx, k_BHSd, v_BHSd)
        k_BHSd = repeat_kv(k_BHSd, H // Hkv)
        v_BHSd = repeat_kv(v_BHSd, H // Hkv)
        if self.cfg.sliding_window is not None:
            mask_B1QK = sliding_window_mask(mask_B1QK, S, k_BHSd.shape[2], self.cfg.sliding_window, self.causal,
                                            x_BSD.device)
        is_causal = self.causal and mask_B1QK is None and k_BHSd.shape[2] == S and S > 1
        o_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BHSd, v_BHSd, attn_mask=mask_B1QK, is_causal=is_causal)
        return linear_call(self.o_proj, o_BHSd.transpose(1, 2).reshape(B, S, H * d))
