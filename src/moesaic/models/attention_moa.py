"""Mixture of attention heads (MoA, Zhang et al. 2022; BAM, Zhang et al. 2024 "BAM! Just Like That"): E
attention experts, each with its own query and output projections, mixed per token by a router.

``out_t = sum_e g_te * o_proj_e( attn(q_e(x_t), K_e, V_e) )`` with ``g_t`` the combine weights of any registered
router (0 outside the token's top-k experts). ``shared_kv: true`` gives every expert the same keys and values
(one ``k_proj``/``v_proj``, as in MoA and BAM's KV-sharing variant; the cache then holds one copy);
``false`` gives each expert its own (BAM's default: all of a dense model's attention parameters are upcycled),
cached side by side as ``E * num_key_value_heads`` heads. Parameter names (``experts.N.q_proj``,
``experts.N.o_proj``, ``k_proj``/``v_proj`` shared or per expert) are what attention upcycling copies a dense
model's attention into. This reference computes every expert densely and weighs the outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.core.config import require
from moesaic.models.attention import ATTENTIONS, MHAConfig, repeat_kv
from moesaic.models.cache import KVCache
from moesaic.models.masks import sliding_window_mask
from moesaic.models.rope import RotaryAngles, RotaryEmbedding, apply_rotary
from moesaic.moe.routing.base import RouterConfig


@dataclasses.dataclass
class MoAAttentionConfig(MHAConfig):
    num_experts: int = 4
    top_k: int = 2
    shared_kv: bool = True
    router: RouterConfig = dataclasses.field(default_factory=lambda: RouterConfig.for_kind("topk"))

    def validate(self, path: str) -> None:
        super().validate(path)
        require(self.num_experts >= 1, f"{path}.num_experts", self.num_experts, "must be >= 1")
        require(1 <= self.top_k <= self.num_experts, f"{path}.top_k", self.top_k,
                f"must be in [1, num_experts] = [1, {self.num_experts}]")
        require(not self.qk_norm, f"{path}.qk_norm", self.qk_norm, "is not supported by moa attention")


class AttentionExpert(nn.Module):
    """One expert's projections: ``q_proj``, ``o_proj`` and, without shared keys/values, ``k_proj``/``v_proj``."""

    def __init__(self, d_model: int, H: int, Hkv: int, d: int, own_kv: bool, bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d_model, H * d, bias=bias)
        if own_kv:
            self.k_proj = nn.Linear(d_model, Hkv * d, bias=bias)
            self.v_proj = nn.Linear(d_model, Hkv * d, bias=bias)
        self.o_proj = nn.Linear(H * d, d_model, bias=o_bias)


@ATTENTIONS.register("moa")
class MixtureOfAttentionHeads(nn.Module):
    """E attention experts (own q/o, shared or own k/v) routed per token; KV cache for generation."""

    Config = MoAAttentionConfig
    #: ``forward`` takes ``rope=`` (:class:`~moesaic.models.rope.RotaryAngles` shared by a forward's layers).
    accepts_rope = True

    def __init__(self, cfg: MoAAttentionConfig, d_model: int, layer_idx: int = 0, *, causal: bool = True,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.cfg, self.layer_idx, self.causal = cfg, layer_idx, causal
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_key_value_heads or cfg.num_heads
        self.head_dim = cfg.head_dim or d_model // cfg.num_heads
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if cfg.shared_kv:
            self.k_proj = nn.Linear(d_model, Hkv * d, bias=cfg.bias)
            self.v_proj = nn.Linear(d_model, Hkv * d, bias=cfg.bias)
        self.experts = nn.ModuleList(AttentionExpert(d_model, H, Hkv, d, not cfg.shared_kv, cfg.bias, cfg.o_bias)
                                     for _ in range(cfg.num_experts))
        self.router = cfg.router.build(d_model, cfg.num_experts, cfg.top_k, causal=causal)
        self.router.layer_name = f"layers.{layer_idx}.self_attn"
        self.rotary_emb = RotaryEmbedding(d, cfg.rope_theta, cfg.rope_scaling)
        self.aux_losses: dict[str, Tensor] = {}

    def gates(self, x_BSD: Tensor) -> Tensor:
        """``[B, S, E]`` combine weights per token; sets ``aux_losses``."""
        B, S, D = x_BSD.shape
        decision = self.router(x_BSD.reshape(B * S, D))
        coefs = self.router.loss_coefs()
        self.aux_losses = {n: coefs[n] * v for n, v in decision.aux_losses.items() if coefs.get(n, 0.0) > 0}
        return decision.dense().to(x_BSD.dtype).view(B, S, -1)

    def forward(self, x_BSD: Tensor, position_ids_BS: Tensor, mask_B1QK: Tensor | None = None,
                cache: KVCache | None = None, rope: RotaryAngles | None = None) -> Tensor:
        B, S, _ = x_BSD.shape
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        experts = cast(list[AttentionExpert], list(self.experts))
        kv: list[Any] = [self] if self.cfg.shared_kv else experts
        k_BHSd = torch.cat([m.k_proj(x_BSD).view(B, S, Hkv, d) for m in kv], 2).transpose(1, 2)
        v_BHSd = torch.cat([m.v_proj(x_BSD).view(B, S, Hkv, d) for m in kv], 2).transpose(1, 2)
        cos, sin = (rope or RotaryAngles(position_ids_BS)).cos_sin(self.rotary_emb, x_BSD.dtype)
        k_BHSd = apply_rotary(k_BHSd, cos, sin)
        if cache is not None:
            k_BHSd, v_BHSd = cache.update(self.layer_idx, k_BHSd, v_BHSd)
        K = k_BHSd.shape[2]
        if self.cfg.sliding_window is not None:
            mask_B1QK = sliding_window_mask(mask_B1QK, S, K, self.cfg.sliding_window, self.causal, x_BSD.device)
        is_causal = self.causal and mask_B1QK is None and K == S and S > 1
        g_BSE = self.gates(x_BSD)
        out_BSD = x_BSD.new_zeros(x_BSD.shape)
        for e, ex in enumerate(experts):
            q_BHSd = apply_rotary(ex.q_proj(x_BSD).view(B, S, H, d).transpose(1, 2), cos, sin)
            j = 0 if self.cfg.shared_kv else e
            k_e = repeat_kv(k_BHSd[:, j * Hkv:(j + 1) * Hkv], H // Hkv)
            v_e = repeat_kv(v_BHSd[:, j * Hkv:(j + 1) * Hkv], H // Hkv)
            o_BHSd = F.scaled_dot_product_attention(q_BHSd, k_e, v_e, attn_mask=mask_B1QK, is_causal=is_causal)
            out_BSD = out_BSD + g_BSE[..., e:e + 1] * ex.o_proj(o_BHSd.transpose(1, 2).reshape(B, S, H * d))
        return out_BSD

    def extra_repr(self) -> str:
        return f"num_experts={self.cfg.num_experts}, top_k={self.cfg.top_k}, shared_kv={self.cfg.shared_kv}"
