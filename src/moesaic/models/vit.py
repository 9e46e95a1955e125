"""Vision Transformer with MoE FFNs and one classification head per task (``model: {kind: vit_classifier}``).

ViT (Dosovitskiy et al. 2021): non-overlapping ``patch_size`` patches, each flattened and projected to
``d_model``, then bidirectional pre-norm blocks (RoPE over the row-major patch index; the blocks of
:class:`~moesaic.models.transformer.TransformerLayer`, dense or MoE) and mean pooling. Multi-task as in
M3ViT (Liang et al. 2022) and Mod-Squad: one shared backbone, a linear head per task
(``task_labels``: classes per task); a batch's ``task_id`` (one per image) selects each image's head and is
passed to the MoE routers (``task_gates`` routes by task; other routers ignore it). Logits are
``[B, max(task_labels)]``, entries beyond an image's task's classes set to ``-inf``, so cross-entropy and
accuracy are those of each image's own task.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from moesaic.core.config import require, rule
from moesaic.models.base import MODELS
from moesaic.models.decoder import LMOutput
from moesaic.models.norms import RMSNorm
from moesaic.models.transformer import TransformerConfig, TransformerLayer, init_weights
from moesaic.moe.api import collect_aux_losses, name_layers


@dataclasses.dataclass
class ViTConfig(TransformerConfig):
    task: ClassVar[str] = "classification"
    image_size: int = rule(8, ge=1)
    patch_size: int = rule(2, ge=1)
    channels: int = rule(1, ge=1)
    task_labels: list[int] = dataclasses.field(default_factory=lambda: [10])

    @property
    def num_labels(self) -> int:
        return max(self.task_labels)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self, path: str) -> None:
        super().validate(path)
        require(self.image_size % self.patch_size == 0, f"{path}.patch_size", self.patch_size,
                f"must divide image_size ({self.image_size})")
        require(len(self.task_labels) >= 1 and all(n >= 1 for n in self.task_labels), f"{path}.task_labels",
                self.task_labels, "must list at least one task with >= 1 class each")
        require(self.num_patches <= self.max_seq_len, f"{path}.max_seq_len", self.max_seq_len,
                f"must be >= the number of patches ({self.num_patches})")


def patchify(pixels_BCHW: Tensor, p: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), C p p]``, patches in row-major order."""
    B, C, H, W = pixels_BCHW.shape
    x = pixels_BCHW.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


@MODELS.register("vit_classifier")
class ViTClassifier(nn.Module):
    """Patch embedding -> Transformer blocks (dense or MoE, bidirectional) -> mean pool -> per-task heads."""

    Config = ViTConfig

    def __init__(self, cfg: ViTConfig, **kw: Any):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.patch_embed = nn.Linear(cfg.channels * p * p, cfg.d_model)
        self.layers = nn.ModuleList([TransformerLayer(cfg, i, causal=False) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.heads = nn.ModuleList([nn.Linear(cfg.d_model, n) for n in cfg.task_labels])
        init_weights(self, cfg.init_std)
        name_layers(self)

    def features(self, pixel_values: Tensor, task_id: Tensor | int | None = None) -> Tensor:
        """Pooled ``[B, D]`` features of ``pixel_values`` (``[B, H, W]`` or ``[B, C, H, W]``)."""
        x = pixel_values if pixel_values.dim() == 4 else pixel_values.unsqueeze(1)
        h_BND = self.patch_embed(patchify(x.to(self.patch_embed.weight.dtype), self.cfg.patch_size))
        B, N, _ = h_BND.shape
        pos_BN = torch.arange(N, device=h_BND.device).expand(B, N)
        ctx = {} if task_id is None else {"task_id": task_id}
        for layer in self.layers:
            h_BND = layer(h_BND, pos_BN, None, None, None, None, **ctx)
        return self.norm(h_BND).mean(1)

    def forward(self, pixel_values: Tensor, task_id: Tensor | int | None = None, return_dict: bool = True
                ) -> LMOutput | Tensor:
        pooled_BD = self.features(pixel_values, task_id)
        B, L = pooled_BD.shape[0], self.cfg.num_labels
        tasks_B = (torch.zeros(B, dtype=torch.long, device=pooled_BD.device) if task_id is None else
                   torch.as_tensor(task_id, device=pooled_BD.device).long().expand(B))
        logits_BL = pooled_BD.new_full((B, L), float("-inf"))
        for t, head in enumerate(self.heads):
            rows = (tasks_B == t).nonzero().squeeze(1)
            if rows.numel():
                logits_BL[rows, : head.out_features] = head(pooled_BD[rows])
        if not return_dict:
            return logits_BL
        return LMOutput(logits_BL, None, collect_aux_losses(self), None)
