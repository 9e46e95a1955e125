"""Token mixers other than softmax attention, as attention kinds (``attention: {kind: pool | linear}``).

* ``pool``: PoolFormer's mixer (Yu et al. 2022, "MetaFormer Is Actually What You Need for Vision"): the
  average of the tokens in a window minus the token itself; no parameters. Non-causal: a centred window of
  ``pool_size``; causal: the token and the ``pool_size - 1`` before it.
* ``linear``: SLAB's simplified linear attention (Guo et al. 2024, "SLAB: Efficient Transformers with
  Simplified Linear Attention and Progressive Re-parameterized Batch Normalization"): ReLU feature maps,
  ``O = phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)`` per head, plus a depthwise convolution of V over the
  sequence (window ``kernel_size``, causal or centred) that restores local detail.

Both honour the same boolean ``[B, 1, S_q, S_kv]`` masks as attention (padding, packed sequences, causality)
and keep a cache for generation through ``cache.update`` (pooling caches its inputs; linear attention its keys
and values), so cached decoding equals the full forward. :func:`linear_attention_reference` is the readable
quadratic form; the causal and bidirectional unmasked cases take the linear-time path (cumulative sums).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.core.config import rule
from moesaic.models.attention import ATTENTIONS, AttentionConfig
from moesaic.models.cache import KVCache


def allowed_keys(mask_B1QK: Tensor | None, B: int, S_q: int, S_kv: int, causal: bool, device: torch.device) -> Tensor:
    """The boolean ``[B, 1, S_q, S_kv]`` of keys each query may use (the given mask, or plain causality)."""
    if mask_B1QK is not None:
        return mask_B1QK.bool().expand(B, 1, S_q, S_kv)
    allowed = torch.ones(B, 1, S_q, S_kv, dtype=torch.bool, device=device)
    if causal:
        q = torch.arange(S_q, device=device)[:, None] + (S_kv - S_q)
        allowed = allowed & (torch.arange(S_kv, device=device)[None] <= q)
    return allowed


def window(S_q: int, S_kv: int, size: int, causal: bool, device: torch.device) -> Tensor:
    """``[S_q, S_kv]``: keys within the window of each query (cache index ``q = past + i``)."""
    q = torch.arange(S_q, device=device)[:, None] + (S_kv - S_q)
    k = torch.arange(S_kv, device=device)[None]
    if causal:
        return (k <= q) & (k > q - size)
    return (k - q).abs() <= size // 2


@dataclasses.dataclass
class PoolConfig(AttentionConfig):
    pool_size: int = rule(3, ge=1, doc="tokens averaged (PoolFormer uses 3)")


@ATTENTIONS.register("pool")
class PoolMixer(nn.Module):
    """PoolFormer token mixer: window average minus identity (MetaFormer, Yu et al. 2022)."""

    Config = PoolConfig

    def __init__(self, cfg: PoolConfig, d_model: int, layer_idx: int = 0, *, causal: bool = True, **kw: Any):
        super().__init__()
        self.cfg, self.layer_idx, self.causal = cfg, layer_idx, causal

    def forward(self, x_BSD: Tensor, position_ids_BS: Tensor, mask_B1QK: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        B, S, _ = x_BSD.shape
        all_BKD = cache.update(self.layer_idx, x_BSD)[0] if cache is not None else x_BSD
        K = all_BKD.shape[1]
        w_BQK = (allowed_keys(mask_B1QK, B, S, K, self.causal, x_BSD.device)[:, 0]
                 & window(S, K, self.cfg.pool_size, self.causal, x_BSD.device)).to(x_BSD.dtype)
        w_BQK = w_BQK / w_BQK.sum(-1, keepdim=True).clamp_min(1.0)
        return torch.bmm(w_BQK, all_BKD) - x_BSD


@dataclasses.dataclass
class LinearAttentionConfig(AttentionConfig):
    kernel_size: int = rule(3, ge=1, doc="depthwise convolution window over V (SLAB)")
    eps: float = rule(1e-6, gt=0.0)


def linear_attention_reference(q_BHQd: Tensor, k_BHKd: Tensor, v_BHKd: Tensor, allowed_B1QK: Tensor,
                               eps: float) -> Tensor:
    """``phi(Q) phi(K)^T`` restricted to allowed keys, row-normalised, times V (phi = ReLU): quadratic time,
    the definition the linear-time path must equal."""
    a_BHQK = (F.relu(q_BHQd) @ F.relu(k_BHKd).transpose(-1, -2)) * allowed_B1QK.to(q_BHQd.dtype)
    return (a_BHQK @ v_BHKd) / (a_BHQK.sum(-1, keepdim=True) + eps)


def linear_attention_fast(q_BHSd: Tensor, k_BHSd: Tensor, v_BHSd: Tensor, causal: bool, eps: float) -> Tensor:
    """The same without a mask, in linear time: running sums of ``phi(k) v^T`` and ``phi(k)`` (causal) or
    their totals (bidirectional)."""
    fq, fk = F.relu(q_BHSd), F.relu(k_BHSd)
    if causal:
        kv_BHSdd = torch.cumsum(fk.unsqueeze(-1) * v_BHSd.unsqueeze(-2), dim=2)
        z_BHSd = torch.cumsum(fk, dim=2)
        num = (fq.unsqueeze(-2) @ kv_BHSdd).squeeze(-2)
        return num / ((fq * z_BHSd).sum(-1, keepdim=True) + eps)
    kv_BHdd = fk.transpose(-1, -2) @ v_BHSd
    return (fq @ kv_BHdd) / (fq @ fk.sum(2).unsqueeze(-1) + eps)


@ATTENTIONS.register("linear")
class LinearAttention(nn.Module):
    """SLAB simplified linear attention: ReLU kernels plus a depthwise convolution of V (Guo et al. 2024)."""

    Config = LinearAttentionConfig

    def __init__(self, cfg: LinearAttentionConfig, d_model: int, layer_idx: int = 0, *, causal: bool = True,
                 **kw: Any):
        super().__init__()
        self.cfg, self.layer_idx, self.causal = cfg, layer_idx, causal
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim or d_model // cfg.num_heads
        H, d = self.num_heads, self.head_dim
        self.q_proj = nn.Linear(d_model, H * d, bias=False)
        self.k_proj = nn.Linear(d_model, H * d, bias=False)
        self.v_proj = nn.Linear(d_model, H * d, bias=False)
        self.o_proj = nn.Linear(H * d, d_model, bias=False)
        self.dwc_weight_HdW = nn.Parameter(torch.zeros(H, d, cfg.kernel_size))  # starts as plain linear attention

    def forward(self, x_BSD: Tensor, position_ids_BS: Tensor, mask_B1QK: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        B, S, _ = x_BSD.shape
        H, d = self.num_heads, self.head_dim
        q, k, v = (p(x_BSD).view(B, S, H, d).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        K = k.shape[2]
        if mask_B1QK is None and cache is None:
            o = linear_attention_fast(q, k, v, self.causal, self.cfg.eps)
        else:
            allowed = allowed_keys(mask_B1QK, B, S, K, self.causal, x_BSD.device)
            o = linear_attention_reference(q, k, v, allowed, self.cfg.eps)
        o = o + self._dwc(v, allowed_keys(mask_B1QK, B, S, K, self.causal, x_BSD.device))
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * d))

    def _dwc(self, v_BHKd: Tensor, allowed_B1QK: Tensor) -> Tensor:
        """Depthwise convolution of V over the window of each query, allowed keys only: ``[B, H, S_q, d]``."""
        B, H, K, d = v_BHKd.shape
        S = allowed_B1QK.shape[2]
        q = torch.arange(S, device=v_BHKd.device) + (K - S)
        out = v_BHKd.new_zeros(B, H, S, d)
        W = self.cfg.kernel_size
        for j in range(W):
            idx = q - j if self.causal else q + j - W // 2
            ok = (idx >= 0) & (idx < K)
            src = idx.clamp(0, K - 1)
            keep_BQ = allowed_B1QK[:, 0, torch.arange(S, device=v_BHKd.device), src] & ok
            out = out + self.dwc_weight_HdW[:, :, j][None, :, None] * v_BHKd[:, :, src] * keep_BQ[:, None, :, None]
        return out
