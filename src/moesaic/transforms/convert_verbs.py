"""The shrinking and neuron-splitting verbs as ``moesaic convert moefy|prune|merge|densify IN OUT --set ...``.

Each entry wraps the Python transform of its own module in the converter form ``verb_(model, cfg,
filter_fn=None, *, extra=()) -> model`` (:mod:`moesaic.transforms.convert`); the transforms and their
papers:

* ``moefy``: MoEfication (Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of
  Experts") and EMoE avg-k gating (Qiu et al. 2023), :func:`moesaic.transforms.moefy.moefy_`;
* ``prune``: expert pruning by usage, saliency or at random (Koishekenov et al. 2023; DeepSpeed-MoE,
  Rajbhandari et al. 2022), :func:`moesaic.transforms.prune.prune_`;
* ``merge``: expert merging, plain average or aligned by optimal transport (Imfeld et al. 2024,
  "Transformer Fusion with Optimal Transport"), :func:`moesaic.transforms.merge.merge_`;
* ``densify``: MoE to dense by Experts Weights Averaging (Huang et al. 2023),
  :func:`moesaic.transforms.densify.densify_`.

Verbs that need calibration data (``moefy`` with ``router: mlp`` or ``split: coactivation``; ``prune`` by
``usage`` or ``saliency``) read it from ``data``, a UTF-8 text file, tokenized with the input model's tokenizer
and run through the model in windows (at most ``data_tokens`` tokens). Docs: docs/convert.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moesaic.core.config import rule
from moesaic.core.errors import ConfigError, ConversionError
from moesaic.transforms.convert import FilterFn, converter
from moesaic.transforms.densify import DensifyConfig, densify_
from moesaic.transforms.merge import MergeConfig, merge_
from moesaic.transforms.moefy import MoefyConfig, moefy_
from moesaic.transforms.prune import PruneConfig, prune_


def text_calibration(model: nn.Module, data: str, max_tokens: int, verb: str) -> Callable[[nn.Module], object]:
    """``calibrate(model)``: the model run on the first ``max_tokens`` tokens of the text file ``data`` (its own
    tokenizer), in windows of the model's maximum length (at most 128)."""
    path = Path(data)
    if not path.is_file():
        raise ConfigError(f"{verb}.data", data, "no such text file")
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ConversionError(f"{verb}.data: the input model has no tokenizer to read {data} with")
    ids = tok.encode(path.read_text(encoding="utf-8"))[:max_tokens]
    if not ids:
        raise ConfigError(f"{verb}.data", data, "holds no tokens")
    mcfg: Any = getattr(model, "cfg", None)
    win = min(128, int(getattr(mcfg, "max_seq_len", 0) or getattr(mcfg, "max_position_embeddings", 128)))
    windows = [ids[s:s + win] for s in range(0, len(ids), win)]

    def calibrate(m: nn.Module) -> None:
        dev = next(m.parameters()).device
        with torch.no_grad():
            for w in windows:
                m(torch.tensor([w], device=dev))

    return calibrate


def _needs_data(cfg: Any, verb: str, what: str) -> None:
    if not cfg.data:
        raise ConfigError(f"{verb}.data", cfg.data, f"{what} needs calibration text: --set data=TEXT_FILE")


@dataclasses.dataclass
class MoefyVerbConfig(MoefyConfig):
    """:class:`~moesaic.transforms.moefy.MoefyConfig` plus the calibration text file."""

    data: str = ""
    data_tokens: int = rule(8192, ge=1)


@converter("moefy", MoefyVerbConfig)
def moefy_verb(model: nn.Module, cfg: MoefyVerbConfig, filter_fn: FilterFn | None = None, *,
               extra: Sequence[nn.Module] = ()) -> nn.Module:
    """MoEfication / EMoE (Zhang et al. 2022; Qiu et al. 2023): dense FFN neurons -> experts."""
    calibrate = None
    if cfg.router == "mlp" or cfg.split == "coactivation" or cfg.recover_steps:
        _needs_data(cfg, "moefy", f"router: {cfg.router}" if cfg.router == "mlp" else
                    "split: coactivation" if cfg.split == "coactivation" else "recover_steps > 0")
        calibrate = text_calibration(model, cfg.data, cfg.data_tokens, "moefy")
    moefy_(model, cfg, filter_fn, calibrate=calibrate)
    return model


@dataclasses.dataclass
class PruneVerbConfig(PruneConfig):
    """:class:`~moesaic.transforms.prune.PruneConfig` plus the calibration text file."""

    data: str = ""
    data_tokens: int = rule(8192, ge=1)


@converter("prune", PruneVerbConfig)
def prune_verb(model: nn.Module, cfg: PruneVerbConfig, filter_fn: FilterFn | None = None, *,
               extra: Sequence[nn.Module] = ()) -> nn.Module:
    """Expert pruning by usage, saliency or at random (Koishekenov et al. 2023; DeepSpeed-MoE)."""
    calibrate = None
    if cfg.by != "random":
        _needs_data(cfg, "prune", f"by: {cfg.by}")
        calibrate = text_calibration(model, cfg.data, cfg.data_tokens, "prune")
    prune_(model, cfg, filter_fn, calibrate=calibrate)
    return model


@converter("merge", MergeConfig)
def merge_verb(model: nn.Module, cfg: MergeConfig, filter_fn: FilterFn | None = None, *,
               extra: Sequence[nn.Module] = ()) -> nn.Module:
    """Expert merging, average or OT-aligned (Imfeld et al. 2024, Transformer Fusion with OT)."""
    merge_(model, cfg, filter_fn)
    return model


@converter("densify", DensifyConfig)
def densify_verb(model: nn.Module, cfg: DensifyConfig, filter_fn: FilterFn | None = None, *,
                 extra: Sequence[nn.Module] = ()) -> nn.Module:
    """MoE to dense by Experts Weights Averaging (Huang et al. 2023)."""
    densify_(model, cfg, filter_fn)
    return model
