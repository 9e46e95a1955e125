"""RoPE frequency scaling for long contexts: linear position interpolation (Chen et al. 2023, arXiv
2306.15595), Llama 3's band-wise scaling (Meta 2024) and YaRN (Peng et al. 2023, arXiv 2309.00071; used by
DeepSeek-V3 with ``mscale``). ``attention.rope_scaling: {type: ..., factor: ...}``.

:func:`rope_frequencies` returns the inverse frequencies and the factor that multiplies ``cos``/``sin``
(YaRN's attention temperature); with ``type: none`` they are the plain RoPE ones. The float32 arithmetic
follows transformers' ``modeling_rope_utils`` so imported checkpoints give the same angles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor

from moesaic.core.config import Section, require, rule


@dataclasses.dataclass
class RopeScalingConfig(Section):
    type: Literal["none", "linear", "llama3", "yarn"] = "none"
    factor: float = rule(1.0, gt=0.0)
    #: Context length of pre-training (llama3, yarn).
    original_max_position_embeddings: int | None = rule(None, ge=1)
    low_freq_factor: float = rule(1.0, gt=0.0)
    high_freq_factor: float = rule(4.0, gt=0.0)
    beta_fast: float = rule(32.0, gt=0.0)
    beta_slow: float = rule(1.0, gt=0.0)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = rule(None, gt=0.0)
    truncate: bool = True

    def validate(self, path: str) -> None:
        if self.type in ("llama3", "yarn"):
            require(self.original_max_position_embeddings is not None, f"{path}.original_max_position_embeddings",
                    None, f"required by rope_scaling type {self.type}")
        if self.type == "llama3":
            require(self.high_freq_factor > self.low_freq_factor, f"{path}.high_freq_factor", self.high_freq_factor,
                    f"must be > low_freq_factor ({self.low_freq_factor})")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, theta: float, cfg: RopeScalingConfig | None = None) -> tuple[Tensor, float]:
    """``(inv_freq [dim / 2], cos/sin factor)``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg is None or cfg.type == "none":
        return inv_freq, 1.0
    if cfg.type == "linear":
        return inv_freq / cfg.factor, 1.0
    old = float(cfg.original_max_position_embeddings or 0)
    if cfg.type == "llama3":
        low_wl, high_wl = old / cfg.low_freq_factor, old / cfg.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wl, inv_freq / cfg.factor, inv_freq)
        smooth = (old / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        return torch.where(medium, smoothed, scaled), 1.0
    # YaRN: interpolate the low frequencies, keep the high ones, ramp between them
    if cfg.attention_factor is not None:
        attn = cfg.attention_factor
    elif cfg.mscale and cfg.mscale_all_dim:
        attn = float(yarn_mscale(cfg.factor, cfg.mscale) / yarn_mscale(cfg.factor, cfg.mscale_all_dim))
    else:
        attn = yarn_mscale(cfg.factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp
    inv = (1.0 / (cfg.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, attn


def softmax_scale_factor(cfg: RopeScalingConfig | None) -> float:
    """DeepSeek's YaRN multiplies the attention softmax scale by ``mscale(factor, mscale_all_dim) ** 2``."""
    if cfg is None or cfg.type == "none" or not cfg.mscale_all_dim:
        return 1.0
    m = yarn_mscale(cfg.factor, cfg.mscale_all_dim)
    return m * m
