"""Rotary position embedding (Su et al. 2021, RoFormer) in the Hugging Face ``rotate_half`` convention.

The first and second halves of each head are rotated together (not interleaved pairs), which is the layout
of Llama/Mixtral/Qwen checkpoints in ``transformers``: ``q' = q * cos + rotate_half(q) * sin`` with
``inv_freq[i] = theta^(-2i/dim)`` and the angle table duplicated across the two halves.

:func:`apply_rotary` is the readable reference. The hot path computes the angles of a forward's positions once
for all layers (:class:`RotaryAngles`, built by the model body) and rotates with :func:`rotate`, which folds
``rotate_half``'s negation into the sine: four elementwise ops instead of eight, bitwise the same result.
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


def signed_sin(sin_BSd: Tensor) -> Tensor:
    """``[-sin_1, sin_2]`` (halves): ``rotate_half(x) * sin == x.roll(d / 2, -1) * signed_sin(sin)`` bit for bit,
    since ``(-a) * b == a * (-b)`` exactly in IEEE arithmetic and a roll only moves lanes."""
    s1, s2 = sin_BSd.chunk(2, dim=-1)
    return torch.cat((-s1, s2), dim=-1)


def rotate(x_BSHd: Tensor, cos_BS1d: Tensor, ssin_BS1d: Tensor) -> Tensor:
    """:func:`apply_rotary` on ``[B, S, H, d]`` (the projection's own layout) with the angles of
    :meth:`RotaryAngles.rotation` (``[B, S, 1, d]``, the sine signed by :func:`signed_sin`); bitwise equal."""
    return x_BSHd * cos_BS1d + x_BSHd.roll(x_BSHd.shape[-1] // 2, -1) * ssin_BS1d


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
        self._scaling = repr(scaling)

    @property
    def key(self) -> tuple[object, ...]:
        """Modules with equal keys compute equal angles (what :class:`RotaryAngles` shares between layers):
        the configuration, and the dtype ``inv_freq`` was cast to (``model.to(torch.bfloat16)`` casts it)."""
        return (self.dim, float(self.theta), self._scaling, self.attention_factor, self.inv_freq.dtype)

    def angles(self, position_ids_BS: Tensor) -> tuple[Tensor, Tensor]:
        """fp32 ``cos``, ``sin`` ``[B, S, dim]`` (YaRN's attention factor applied)."""
        device = position_ids_BS.device.type
        if torch.is_autocast_enabled(device):  # fp32 angles under autocast too
            with torch.autocast(device_type=device, enabled=False):
                return self._angles(position_ids_BS)
        return self._angles(position_ids_BS)

    def _angles(self, position_ids_BS: Tensor) -> tuple[Tensor, Tensor]:
        inv = self.inv_freq.to(position_ids_BS.device, torch.float32)  # fp32 like transformers, even in fp64
        freqs_BSh = position_ids_BS.float().unsqueeze(-1) * inv
        emb_BSd = torch.cat((freqs_BSh, freqs_BSh), dim=-1)
        cos, sin = emb_BSd.cos(), emb_BSd.sin()
        if self.attention_factor != 1.0:  # YaRN temperature (rope_scaling.py)
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos, sin

    def forward(self, position_ids_BS: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cos, sin = self.angles(position_ids_BS)
        return cos.to(dtype), sin.to(dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}"


class RotaryAngles:
    """The rotary angles of one forward's ``position_ids``, computed once per rotary configuration (and
    dtype) and shared by every layer of that forward: a model body builds one per forward and hands it to
    each attention (``rope=``); an attention called without one builds its own. The values are those of
    :meth:`RotaryEmbedding.forward` (the same ops on the same tensors), only not recomputed per layer."""

    def __init__(self, position_ids_BS: Tensor):
        self.position_ids_BS = position_ids_BS
        self._memo: dict[tuple[object, ...], tuple[Tensor, Tensor]] = {}

    def cos_sin(self, emb: RotaryEmbedding, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``emb(position_ids, dtype)``: ``cos``, ``sin`` ``[B, S, dim]``."""
        key = ("cos_sin", emb.key, dtype)
        out = self._memo.get(key)
        if out is None:
            cos, sin = self._fp32(emb)
            out = self._memo[key] = (cos, sin) if cos.dtype == dtype else (cos.to(dtype), sin.to(dtype))
        return out

    def rotation(self, emb: RotaryEmbedding, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``cos`` and the signed sine ``[B, S, 1, dim]`` for :func:`rotate`."""
        key = ("rotation", emb.key, dtype)
        out = self._memo.get(key)
        if out is None:
            cos, sin = self.cos_sin(emb, dtype)
            out = self._memo[key] = (cos.unsqueeze(2), signed_sin(sin).unsqueeze(2))
        return out

    def _fp32(self, emb: RotaryEmbedding) -> tuple[Tensor, Tensor]:
        key = ("fp32", emb.key)
        out = self._memo.get(key)
        if out is None:
            out = self._memo[key] = emb.angles(self.position_ids_BS)
        return out
