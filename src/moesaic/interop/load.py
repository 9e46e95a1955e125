"""One loader for what users point commands at: a moesaic checkpoint or a Hugging Face model folder.

``moesaic.load(path)`` and every command that takes ``CKPT_OR_HF_DIR`` (``generate``, ``serve``,
``analyze``, ``convert``) call :func:`load_any`: a folder with ``config.json`` is a Hugging Face folder
(imported with :func:`moesaic.interop.hf.from_hf`, its ``tokenizer.json`` as the tokenizer); anything
else is a moesaic checkpoint (a step folder, or a run folder whose ``LATEST`` names one;
:func:`moesaic.train.checkpoint.load_model`, hashes checked). See docs/hf.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moesaic.core.errors import CheckpointError, ConversionError
from moesaic.train.objectives.distill import TEACHER_LOADERS


def is_hf_folder(path: str | os.PathLike[str]) -> bool:
    """A Hugging Face model folder: it holds ``config.json`` (a moesaic checkpoint never does)."""
    return (Path(path) / "config.json").is_file()


def load_any(path: str | os.PathLike[str], *, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None, lazy: bool = False) -> nn.Module:
    """The model in ``path`` (moesaic checkpoint or Hugging Face folder), in eval mode, with ``.tokenizer``
    (a :class:`~moesaic.train.tokenizer.TextTokenizer`, or None when the folder has none). With ``lazy`` the
    model is a skeleton on the meta device whose weights stay on disk until asked for (``model.lazy_state``:
    :mod:`moesaic.train.lazy_load`); it can be converted and saved (streamed), not run."""
    from moesaic.interop.hf import from_hf
    from moesaic.train.checkpoint import load_model
    from moesaic.train.lazy_load import load_checkpoint_lazily
    from moesaic.train.tokenizer import TextTokenizer

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint or Hugging Face folder not found: {p}")
    if lazy and device is not None:
        raise ConversionError("load_any(lazy=True) keeps the weights on disk: no device to move them to")
    if not is_hf_folder(p):
        return load_checkpoint_lazily(p, dtype) if lazy else load_model(p, device=device, dtype=dtype)
    model: Any = from_hf(p, dtype=dtype, lazy=lazy)
    if device is not None:
        model.to(device)
    model.tokenizer = None
    tok = p / "tokenizer.json"
    if tok.is_file():
        try:
            model.tokenizer = TextTokenizer.load(tok)
        except Exception as e:  # noqa: BLE001 - any unreadable tokenizer file is a corrupt folder
            raise ConversionError(f"{tok}: unreadable tokenizer ({type(e).__name__}: {e})") from None
    return model


def _hf_teacher(path: Path) -> nn.Module | None:
    """Distillation teachers may be Hugging Face folders (train.objective.teacher; docs/convert.md)."""
    return load_any(path) if is_hf_folder(path) else None


TEACHER_LOADERS.append(_hf_teacher)
