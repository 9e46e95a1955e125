"""Diffusion Transformer with MoE FFNs (``model: {kind: dit}``): DiT (Peebles & Xie 2023) with the MoE
blocks of DiT-MoE (Fei et al. 2024, "Scaling Diffusion Transformers to 16 Billion Parameters": routed experts
plus shared experts, ``moe.shared_experts``), class-conditional, predicting the noise of DDPM (Ho et al. 2020).

Conditioning is DiT's in-context variant: two extra tokens, the sinusoidal timestep embedding (through an MLP)
and the class embedding (class ``num_classes`` is "no class", used for classifier-free guidance, Ho &
Salimans 2022), precede the patch tokens; bidirectional pre-norm blocks; a linear head turns each patch token
back into its pixels' noise. :func:`sample` runs ancestral DDPM sampling with optional guidance.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from moesaic.core.config import require, rule
from moesaic.models.base import MODELS
from moesaic.models.decoder import LMOutput
from moesaic.models.norms import RMSNorm
from moesaic.models.transformer import TransformerConfig, TransformerLayer, init_weights
from moesaic.models.vit import patchify
from moesaic.moe.api import collect_aux_losses, name_layers


@dataclasses.dataclass
class DiTConfig(TransformerConfig):
    task: ClassVar[str] = "denoise"
    image_size: int = rule(8, ge=1)
    patch_size: int = rule(2, ge=1)
    channels: int = rule(1, ge=1)
    num_classes: int = rule(10, ge=1)
    diffusion_steps: int = rule(200, ge=2, doc="T of the linear beta schedule (Ho et al. 2020)")
    beta_start: float = rule(1e-4, gt=0.0)
    beta_end: float = rule(0.02, gt=0.0, lt=1.0)

    def validate(self, path: str) -> None:
        super().validate(path)
        require(self.image_size % self.patch_size == 0, f"{path}.patch_size", self.patch_size,
                f"must divide image_size ({self.image_size})")
        n = (self.image_size // self.patch_size) ** 2 + 2
        require(n <= self.max_seq_len, f"{path}.max_seq_len", self.max_seq_len,
                f"must be >= patches + 2 conditioning tokens ({n})")


def alphas_bar(steps: int, beta_start: float, beta_end: float) -> Tensor:
    """``prod_s (1 - beta_s)`` for t = 0 .. T-1 of the linear schedule, float64."""
    betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def timestep_embedding(t_B: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of integer timesteps (Vaswani et al. 2017; DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t_B.device, dtype=torch.float32) / half)
    args = t_B.float()[:, None] * freqs[None]
    emb = torch.cat((args.cos(), args.sin()), -1)
    return emb if dim % 2 == 0 else torch.cat((emb, emb.new_zeros(len(t_B), 1)), -1)


@MODELS.register("dit")
class DiT(nn.Module):
    """Class-conditional DiT(-MoE): predicts the noise of a noisy image at timestep t."""

    Config = DiTConfig

    def __init__(self, cfg: DiTConfig, **kw: Any):
        super().__init__()
        self.cfg = cfg
        p, D = cfg.patch_size, cfg.d_model
        self.patch_embed = nn.Linear(cfg.channels * p * p, D)
        self.time_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.class_embed = nn.Embedding(cfg.num_classes + 1, D)
        self.layers = nn.ModuleList([TransformerLayer(cfg, i, causal=False) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        self.head = nn.Linear(D, cfg.channels * p * p)
        init_weights(self, cfg.init_std)
        nn.init.zeros_(self.head.weight)  # DiT's zero-initialised output layer
        name_layers(self)

    def forward(self, noisy: Tensor, timestep: Tensor, class_labels: Tensor | None = None,
                return_dict: bool = True) -> LMOutput | Tensor:
        """``noisy`` ``[B, H, W]`` (or ``[B, C, H, W]``), ``timestep`` ``[B]``, ``class_labels`` ``[B]`` (None or
        ``num_classes``: unconditional) -> predicted noise, the shape of ``noisy``."""
        x = noisy if noisy.dim() == 4 else noisy.unsqueeze(1)
        B, C, H, W = x.shape
        p = self.cfg.patch_size
        h_BND = self.patch_embed(patchify(x.to(self.patch_embed.weight.dtype), p))
        if class_labels is None:
            class_labels = torch.full((B,), self.cfg.num_classes, dtype=torch.long, device=x.device)
        t_BD = self.time_mlp(timestep_embedding(timestep, self.cfg.d_model).to(h_BND.dtype))
        h = torch.cat((t_BD[:, None], self.class_embed(class_labels)[:, None], h_BND), 1)
        pos = torch.arange(h.shape[1], device=h.device).expand(B, h.shape[1])
        for layer in self.layers:
            h = layer(h, pos, None, None, None, None)
        out_BNP = self.head(self.norm(h[:, 2:]))
        g = H // p
        eps = out_BNP.reshape(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
        eps = eps if noisy.dim() == 4 else eps[:, 0]
        if not return_dict:
            return eps
        return LMOutput(eps, None, collect_aux_losses(self), None)


@torch.no_grad()
def sample(model: DiT, class_labels: Tensor, guidance: float = 0.0, generator: torch.Generator | None = None
           ) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, algorithm 2, sigma_t^2 = beta_t) of one image per label;
    ``guidance`` > 0: classifier-free guidance ``eps_u + (1 + w)(eps_c - eps_u)``."""
    cfg = model.cfg
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    abar = alphas_bar(cfg.diffusion_steps, cfg.beta_start, cfg.beta_end).to(dev)
    betas = 1 - abar / torch.cat((abar.new_ones(1), abar[:-1]))
    B = len(class_labels)
    x = torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size, generator=generator, device=dev)
    null = torch.full_like(class_labels, cfg.num_classes)
    for t in range(cfg.diffusion_steps - 1, -1, -1):
        tt = torch.full((B,), t, dtype=torch.long, device=dev)
        eps = model(x, tt, class_labels).logits.double()
        if guidance > 0:
            eps_u = model(x, tt, null).logits.double()
            eps = eps_u + (1 + guidance) * (eps - eps_u)
        mean = (x.double() - betas[t] / (1 - abar[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
        noise = torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float64) if t > 0 else 0.0
        x = (mean + betas[t].sqrt() * noise).float()
    model.train(was)
    return x[:, 0] if cfg.channels == 1 else x
