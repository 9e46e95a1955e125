"""Which folders an export may write into.

A Hugging Face export replaces ``config.json``, the weight files and the tokenizer files of its folder and
deletes stale weight shards there (as ``save_pretrained`` does), so the folder the user names must be new,
empty, or an earlier moesaic export: every ``*.safetensors`` file in it carries the weight-layout tag that
moesaic writes (a downloaded model's folder does not, and exporting over it would mix two models).
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from moesaic.core.errors import ConversionError
from moesaic.interop.mapping import LAYOUT_TAG


def check_export_folder(out: Path) -> None:
    """Raise :class:`ConversionError` naming ``out`` unless an export may write there."""
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: the export folder is a file")
    if not out.exists() or not any(out.iterdir()):
        return
    weights = sorted(out.glob("*.safetensors"))
    if weights and all(_written_by_moesaic(w) for w in weights):
        return
    raise ConversionError(f"{out}: a non-empty folder that no moesaic export wrote (no *.safetensors with the "
                          f"{LAYOUT_TAG} tag); export into a new or empty folder")


def _written_by_moesaic(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            return LAYOUT_TAG in (f.metadata() or {})
    except (OSError, SafetensorError):
        return False
