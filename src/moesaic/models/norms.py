"""RMSNorm (Zhang & Sennrich 2019), computed in fp32 like Hugging Face Llama's ``LlamaRMSNorm``."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``; the statistic in fp32, the result cast back before scaling."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """:class:`RMSNorm`'s computation (a function, so a decode step can run it without the module call)."""
    dtype = x.dtype
    low = dtype in (torch.float16, torch.bfloat16)
    h = x.to(torch.float32) if low else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h.to(dtype) if low else h)  # fp32/fp64: no cast (one op less per call)
