"""Rotary position embedding (Su et al. 2021, RoFormer) in the Hugging Face ``rotate_half`` convention.

The first and second halves of each head are rotated together (not interleaved pairs), which is the layout
of Llama/Mixtral/Qwen checkpoints in ``transformers``: ``q' = q * cos + rotate_half(q) * sin`` with
``inv_freq[i] = theta^(-2i/dim)`` and the angle table duplicated across the two halves.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moesaic.models.rope_scaling import RopeScalingConfig, rope_frequencies


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x_BHSd: Tensor, cos_BSd: Tensor, sin_BSd: Tensor) -> Tensor:
    """Rotate ``[B, H, S, d]`` by angles ``[B, S, d]`` (broadcast over heads)."""
    cos, sin = cos_BSd.unsqueeze(1), sin_BSd.unsqueeze(1)
    return x_BHSd * cos + rotate_half(x_BHSd) * sin


class RotaryEmbedding(nn.Module):
    """Computes ``cos``/``sin`` ``[B, S, dim]`` for integer ``position_ids`` ``[B, S]`` in fp32."""

    inv_freq: Tensor

    def __init__(self, dim: int, theta: float = 10000.0, scaling: RopeScalingConfig | None = None):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dimension must be even, got {dim}")
        self.dim, self.theta = dim, theta
        inv_freq, self.attention_factor = rope_frequencies(dim, theta, scaling)  # plain RoPE without scaling
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids_BS: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        inv = self.inv_freq.to(position_ids_BS.device, torch.float32)  # fp32 like transformers, even in fp64
        with torch.autocast(device_type=position_ids_BS.device.type, enabled=False):
            freqs_BSh = position_ids_BS.float().unsqueeze(-1) * inv
            emb_BSd = torch.cat((freqs_BSh, freqs_BSh), dim=-1)
            cos, sin = emb_BSd.cos(), emb_BSd.sin()
            if self.attention_factor != 1.0:  # YaRN temperature (rope_scaling.py)
                cos, sin = cos * self.attention_factor, sin * self.attention_factor
            return cos.to(dtype), sin.to(dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}"
