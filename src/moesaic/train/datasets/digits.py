"""scikit-learn's handwritten digits (1,797 real 8x8 images, UCI) as a multi-task image dataset
(``data: {kind: digits_multitask}``): every image answers ``tasks`` questions (default: the digit (10
classes), its parity (2) and whether it is >= 5 (2)), M3ViT-style multi-task learning on one backbone.

Images are split once, stratified by digit with ``split_seed`` (``val_fraction`` held out), scaled to
[0, 1]. A training example is an (image, task) pair; an epoch visits every pair once in a seeded order.
Batches hold ``pixel_values`` ``[B, 8, 8]``, ``task_id`` ``[B]`` and ``labels`` ``[B]``; evaluation covers
every validation image under every task.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from moesaic.core.config import require, rule
from moesaic.train.datasets.base import DATASETS, DataConfig, Dataset
from moesaic.train.loader import EpochPosition

Task = Literal["digit", "parity", "ge5"]
CLASSES: dict[str, int] = {"digit": 10, "parity": 2, "ge5": 2}


def task_labels(task: str, digit_N: np.ndarray) -> np.ndarray:
    """The label of each digit under ``task``."""
    if task == "digit":
        return digit_N
    if task == "parity":
        return digit_N % 2
    return (digit_N >= 5).astype(digit_N.dtype)


def split_digits(val_fraction: float, split_seed: int) -> tuple[Tensor, Tensor, np.ndarray, np.ndarray]:
    """Training and validation images ``[N, 8, 8]`` in [0, 1] and their digits, stratified by digit."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    idx_tr, idx_va = train_test_split(np.arange(len(d.target)), test_size=val_fraction, random_state=split_seed,
                                      stratify=d.target)
    return torch.from_numpy(x[idx_tr]), torch.from_numpy(x[idx_va]), d.target[idx_tr], d.target[idx_va]


@dataclasses.dataclass
class DigitsConfig(DataConfig):
    tasks: list[Task] = dataclasses.field(default_factory=lambda: ["digit", "parity", "ge5"])
    val_fraction: float = rule(0.2, gt=0.0, lt=1.0)
    split_seed: int = 0

    def validate(self, path: str) -> None:
        require(len(self.tasks) >= 1 and len(set(self.tasks)) == len(self.tasks), f"{path}.tasks", self.tasks,
                "must list at least one task, each once")


class TaskPairLoader(EpochPosition):
    """(image, task) pairs in a seeded order; its position is saved with every checkpoint."""

    def __init__(self, x_NHW: Tensor, y_NT: Tensor, seed: int = 0):
        self.x_NHW, self.y_NT = x_NHW, y_NT
        N, T = y_NT.shape
        super().__init__(N * T, seed, True, None)

    def next_batch(self, batch_size: int) -> dict[str, Tensor]:
        pairs = torch.tensor(self.take(batch_size), dtype=torch.long)
        img, task = pairs // self.y_NT.shape[1], pairs % self.y_NT.shape[1]
        return {"pixel_values": self.x_NHW[img].contiguous(), "task_id": task, "labels": self.y_NT[img, task]}

    def identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "images": int(self.y_NT.shape[0]), "tasks": int(self.y_NT.shape[1])}


@DATASETS.register("digits_multitask")
class DigitsMultiTask(Dataset):
    """Handwritten digits (scikit-learn), several classification tasks per image (M3ViT-style)."""

    Config = DigitsConfig
    cfg: DigitsConfig

    def __init__(self, cfg: DigitsConfig, **kw: Any):
        self.cfg = cfg
        self.train_x, self.val_x, d_tr, d_va = split_digits(cfg.val_fraction, cfg.split_seed)
        self.train_y, self.val_y = (torch.from_numpy(np.stack([task_labels(t, d) for t in cfg.tasks], 1)
                                                     .astype(np.int64)) for d in (d_tr, d_va))
        self.task_classes = [CLASSES[t] for t in cfg.tasks]
        self.num_labels = max(self.task_classes)

    def loader(self, seed: int) -> TaskPairLoader:
        return TaskPairLoader(self.train_x, self.train_y, seed)

    def eval_batches(self, batch_size: int, task: int | None = None) -> list[dict[str, Tensor]]:
        """Every validation image under every task (or only ``task``), in task-major order."""
        out = []
        for t in range(len(self.cfg.tasks)) if task is None else [task]:
            for i in range(0, len(self.val_x), batch_size):
                x = self.val_x[i: i + batch_size]
                out.append({"pixel_values": x, "task_id": torch.full((len(x),), t, dtype=torch.long),
                            "labels": self.val_y[i: i + batch_size, t]})
        return out


@dataclasses.dataclass
class DigitsDiffusionConfig(DataConfig):
    """Digits for DDPM training; the schedule must equal the model's (checked when the run starts)."""

    val_fraction: float = rule(0.2, gt=0.0, lt=1.0)
    split_seed: int = 0
    diffusion_steps: int = rule(200, ge=2)
    beta_start: float = rule(1e-4, gt=0.0)
    beta_end: float = rule(0.02, gt=0.0, lt=1.0)
    class_dropout: float = rule(0.1, ge=0.0, le=1.0, doc="share of labels replaced by 'no class' (guidance)")
    num_classes: int = 10


class NoisedDigitsLoader(TaskPairLoader):
    """DDPM training pairs: an image, a timestep and noise drawn from a generator seeded by the loader's
    position (so a resumed run draws the same), the noised image and the noise as the target."""

    def __init__(self, x_NHW: Tensor, y_N: Tensor, seed: int, cfg: DigitsDiffusionConfig):
        super().__init__(x_NHW, y_N[:, None], seed)
        from moesaic.models.dit import alphas_bar

        self.cfg = cfg
        self.abar = alphas_bar(cfg.diffusion_steps, cfg.beta_start, cfg.beta_end).float()

    def next_batch(self, batch_size: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7_919 + self.index)
        b = super().next_batch(batch_size)
        x0 = b["pixel_values"] * 2 - 1
        t = torch.randint(0, self.cfg.diffusion_steps, (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = self.abar[t][:, None, None]
        drop = torch.rand(batch_size, generator=g) < self.cfg.class_dropout
        y = torch.where(drop, torch.full_like(b["labels"], self.cfg.num_classes), b["labels"])
        return {"noisy": a.sqrt() * x0 + (1 - a).sqrt() * eps, "timestep": t, "class_labels": y, "labels": eps}


@DATASETS.register("digits_diffusion")
class DigitsDiffusion(Dataset):
    """Handwritten digits (scikit-learn) noised for DDPM training of a class-conditional DiT."""

    Config = DigitsDiffusionConfig
    cfg: DigitsDiffusionConfig

    def __init__(self, cfg: DigitsDiffusionConfig, **kw: Any):
        self.cfg = cfg
        self.train_x, self.val_x, d_tr, d_va = split_digits(cfg.val_fraction, cfg.split_seed)
        self.train_y, self.val_y = torch.from_numpy(d_tr.astype(np.int64)), torch.from_numpy(d_va.astype(np.int64))

    def loader(self, seed: int) -> NoisedDigitsLoader:
        return NoisedDigitsLoader(self.train_x, self.train_y, seed, self.cfg)

    def eval_batches(self, batch_size: int) -> list[dict[str, Tensor]]:
        """Every validation image at fixed timesteps and noise (seed 0, no class dropout): the denoising loss."""
        eval_cfg = dataclasses.replace(self.cfg, class_dropout=0.0)
        ld = NoisedDigitsLoader(self.val_x, self.val_y, 0, eval_cfg)
        ld.shuffle = False
        n = len(self.val_y)
        return [ld.next_batch(min(batch_size, n - i)) for i in range(0, n, batch_size)]
