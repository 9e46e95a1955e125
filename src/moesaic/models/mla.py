"""Multi-head Latent Attention (MLA; DeepSeek-V2, arXiv 2405.04434 Sec. 2.1; DeepSeek-V3, arXiv 2412.19437 Sec. 2.1.1).

Keys and values are compressed into one latent ``c_KV`` of width ``kv_lora_rank`` per token (RMS-normed),
plus one rotary key ``k_R`` of width ``qk_rope_head_dim`` shared by all heads ("decoupled RoPE"). The
cache stores only ``[c_KV, k_R]`` (``kv_lora_rank + qk_rope_head_dim`` numbers per token instead of
``2 * H * head_dim``); ``kv_b_proj`` expands the latent into per-head no-RoPE keys and values. Queries are
optionally low-rank too (``q_lora_rank``). Scores use ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``.

Parameter names follow Hugging Face ``DeepseekV3Attention`` (``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``
or ``q_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``), so checkpoints map
one to one. ``rope_interleave: true`` rotates adjacent pairs ``(x0, x1), (x2, x3) ...`` like DeepSeek's
released weights; ``false`` rotates halves like Llama.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.core.config import require, rule
from moesaic.models.attention import ATTENTIONS, AttentionConfig
from moesaic.models.cache import KVCache
from moesaic.models.norms import RMSNorm
from moesaic.models.rope import RotaryAngles, RotaryEmbedding, apply_rotary
from moesaic.models.rope_scaling import softmax_scale_factor


@dataclasses.dataclass
class MLAConfig(AttentionConfig):
    q_lora_rank: int | None = rule(None, ge=1)
    kv_lora_rank: int = rule(32, ge=1)
    qk_nope_head_dim: int = rule(16, ge=0)
    qk_rope_head_dim: int = rule(8, ge=2)
    v_head_dim: int = rule(16, ge=1)
    rope_interleave: bool = True
    bias: bool = False
    latent_norm_eps: float = rule(1e-6, gt=0.0)

    def validate(self, path: str) -> None:
        require(self.qk_rope_head_dim % 2 == 0, f"{path}.qk_rope_head_dim", self.qk_rope_head_dim,
                "must be even (RoPE rotates pairs)")

    def validate_model(self, path: str, d_model: int) -> None:
        pass  # head widths are explicit; nothing depends on d_model


def apply_rotary_interleaved(x_BHSr: Tensor, cos_BSr: Tensor, sin_BSr: Tensor) -> Tensor:
    """RoPE on adjacent pairs; the result lists the rotated even lanes, then the odd ones (the order of
    transformers' ``apply_rotary_pos_emb_interleave``; q and k get the same order, so scores are unchanged)."""
    half = cos_BSr.shape[-1] // 2
    cos, sin = cos_BSr[..., :half].unsqueeze(1), sin_BSr[..., :half].unsqueeze(1)
    x1, x2 = x_BHSr[..., 0::2], x_BHSr[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@ATTENTIONS.register("mla")
class MultiHeadLatentAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3): low-rank KV latent cache with decoupled RoPE."""

    Config = MLAConfig
    #: ``forward`` takes ``rope=`` (:class:`~moesaic.models.rope.RotaryAngles` shared by a forward's layers).
    accepts_rope = True

    def __init__(self, cfg: MLAConfig, d_model: int, layer_idx: int = 0, *, causal: bool = True,
                 norm_eps: float = 1e-6, **kw: Any):
        super().__init__()
        self.cfg, self.layer_idx, self.causal = cfg, layer_idx, causal
        H = self.num_heads = cfg.num_heads
        self.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, cfg.q_lora_rank, bias=cfg.bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.latent_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d_model, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.latent_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, d_model, bias=cfg.bias)
        self.rotary_emb = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.scaling = self.qk_head_dim ** -0.5 * softmax_scale_factor(cfg.rope_scaling)

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return apply_rotary_interleaved(x, cos, sin) if self.cfg.rope_interleave else apply_rotary(x, cos, sin)

    def forward(self, x_BSD: Tensor, position_ids_BS: Tensor, mask_B1QK: Tensor | None = None,
                cache: KVCache | None = None, rope: RotaryAngles | None = None) -> Tensor:
        cfg, H = self.cfg, self.num_heads
        B, S, _ = x_BSD.shape
        nope, rdim, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        q = self.q_proj(x_BSD) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_BHSq = q.view(B, S, H, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rot = q_BHSq.split([nope, rdim], dim=-1)
        c_BSC, k_rot_BSr = self.kv_a_proj_with_mqa(x_BSD).split([C, rdim], dim=-1)
        c_B1SC = self.kv_a_layernorm(c_BSC).view(B, 1, S, C)
        k_rot_B1Sr = k_rot_BSr.reshape(B, 1, S, rdim)
        cos, sin = (rope or RotaryAngles(position_ids_BS)).cos_sin(self.rotary_emb, q_BHSq.dtype)
        q_rot, k_rot_B1Sr = self._rope(q_rot, cos, sin), self._rope(k_rot_B1Sr, cos, sin)
        if cache is not None:  # the compressed latent is what MLA caches
            c_B1SC, k_rot_B1Sr = cache.update(self.layer_idx, c_B1SC, k_rot_B1Sr)
        K = c_B1SC.shape[2]
        kv_BHK = self.kv_b_proj(c_B1SC).view(B, K, H, nope + cfg.v_head_dim).transpose(1, 2)
        k_nope, v_BHKv = kv_BHK.split([nope, cfg.v_head_dim], dim=-1)
        k_BHKq = torch.cat((k_nope, k_rot_B1Sr.expand(B, H, K, rdim)), dim=-1)
        q_BHSq = torch.cat((q_nope, q_rot), dim=-1)
        is_causal = self.causal and mask_B1QK is None and K == S and S > 1
        o_BHSv = F.scaled_dot_product_attention(q_BHSq, k_BHKq, v_BHKv, attn_mask=mask_B1QK, is_causal=is_causal,
                                                scale=self.scaling)
        return self.o_proj(o_BHSv.transpose(1, 2).reshape(B, S, H * cfg.v_head_dim))
