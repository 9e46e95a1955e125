"""A dense FFN with Hugging Face names (``gate_proj``, ``up_proj``, ``down_proj``): the dense baseline,
the shared experts of DeepSeekMoE/Qwen2-MoE and the source of sparse upcycling."""

from __future__ import annotations

from torch import Tensor, nn

from moesaic.core.activations import ACTIVATIONS


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str = "silu", gated: bool = True, bias: bool = False):
        super().__init__()
        self.d_model, self.d_ff, self.activation, self.gated, self.bias = d_model, d_ff, activation, gated, bias
        if gated:
            self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)  # bias: ViT/timm-style MLPs (GNT-MOVE FFN_perm)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        act = ACTIVATIONS[self.activation]
        h = act(self.gate_proj(x)) * self.up_proj(x) if self.gated else act(self.up_proj(x))
        y: Tensor = self.down_proj(h)
        return y
