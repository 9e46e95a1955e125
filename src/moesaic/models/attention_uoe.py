"""Selective multi-head attention (Union of Experts, Yang et al. 2025): the heads are experts, and a router
over each token's input picks the heads whose outputs that token uses.

``out_t = o_proj( concat_h g_th * head_h(t) )`` with ``g_t`` the combine weights of any registered router
(``router: {kind: topk, ...}``; 0 outside the token's top-k heads). Every head's keys and values are computed
and cached for all positions (a later token may select any head); a head's query and output are needed only
where it is selected, which this reference computes densely and masks. Aux losses of the router are stored in
``aux_losses`` (summed by ``moesaic.collect_aux_losses``).
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from torch import Tensor

from moesaic.core.config import require
from moesaic.models.attention import ATTENTIONS, MHAConfig, MultiHeadAttention, repeat_kv
from moesaic.models.cache import KVCache
from moesaic.models.masks import sliding_window_mask
from moesaic.models.rope import RotaryAngles, apply_rotary
from moesaic.moe.routing.base import RouterConfig


@dataclasses.dataclass
class UoEAttentionConfig(MHAConfig):
    #: Heads each token uses (of ``num_heads``).
    top_k: int = 2
    router: RouterConfig = dataclasses.field(default_factory=lambda: RouterConfig.for_kind("topk"))

    def validate(self, path: str) -> None:
        super().validate(path)
        require(1 <= self.top_k <= self.num_heads, f"{path}.top_k", self.top_k,
                f"must be in [1, num_heads] = [1, {self.num_heads}]")


@ATTENTIONS.register("uoe")
class SelectiveMultiHeadAttention(MultiHeadAttention):
    """MHA/GQA whose heads are routed per token (Union of Experts); ``mha`` with ``router`` and ``top_k``."""

    Config = UoEAttentionConfig

    def __init__(self, cfg: UoEAttentionConfig, d_model: int, layer_idx: int = 0, *, causal: bool = True,
                 norm_eps: float = 1e-6):
        super().__init__(cfg, d_model, layer_idx, causal=causal, norm_eps=norm_eps)
        self.router = cfg.router.build(d_model, cfg.num_heads, cfg.top_k, causal=causal)
        self.router.layer_name = f"layers.{layer_idx}.self_attn"
        self.aux_losses: dict[str, Tensor] = {}

    def head_gates(self, x_BSD: Tensor) -> Tensor:
        """``[B, S, H]`` combine weights of the heads per token; sets ``aux_losses``."""
        B, S, D = x_BSD.shape
        decision = self.router(x_BSD.reshape(B * S, D))
        coefs = self.router.loss_coefs()
        self.aux_losses = {n: coefs[n] * v for n, v in decision.aux_losses.items() if coefs.get(n, 0.0) > 0}
        return decision.dense().to(x_BSD.dtype).view(B, S, -1)

    def forward(self, x_BSD: Tensor, position_ids_BS: Tensor, mask_B1QK: Tensor | None = None,
                cache: KVCache | None = None, rope: RotaryAngles | None = None) -> Tensor:
        B, S, _ = x_BSD.shape
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k = self.q_proj(x_BSD), self.k_proj(x_BSD)
        if self.cfg.qk_norm and self.cfg.qk_norm_scope == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, S, H, d), k.view(B, S, Hkv, d)
        v = self.v_proj(x_BSD).view(B, S, Hkv, d)
        if self.cfg.qk_norm and self.cfg.qk_norm_scope == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHSd, k_BHSd, v_BHSd = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = (rope or RotaryAngles(position_ids_BS)).cos_sin(self.rotary_emb, q_BHSd.dtype)
        q_BHSd, k_BHSd = apply_rotary(q_BHSd, cos, sin), apply_rotary(k_BHSd, cos, sin)
        if cache is not None:
            k_BHSd, v_BHSd = cache.update(self.layer_idx, k_BHSd, v_BHSd)
        k_BHSd, v_BHSd = repeat_kv(k_BHSd, H // Hkv), repeat_kv(v_BHSd, H // Hkv)
        if self.cfg.sliding_window is not None:
            mask_B1QK = sliding_window_mask(mask_B1QK, S, k_BHSd.shape[2], self.cfg.sliding_window, self.causal,
                                            x_BSD.device)
        is_causal = self.causal and mask_B1QK is None and k_BHSd.shape[2] == S and S > 1
        o_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BHSd, v_BHSd, attn_mask=mask_B1QK, is_causal=is_causal)
        o_BSHd = o_BHSd.transpose(1, 2) * self.head_gates(x_BSD)[..., None]
        return self.o_proj(o_BSHd.reshape(B, S, H * d))


__all__ = ["SelectiveMultiHeadAttention", "UoEAttentionConfig"]
