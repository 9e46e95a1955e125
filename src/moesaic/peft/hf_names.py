"""Hugging Face module names of a moesaic model imported from (or exportable to) transformers, read from the
architecture's weight layout (``moesaic.interop``), so a PEFT adapter written from the moesaic model loads on
the transformers model."""

from __future__ import annotations

from typing import Any

from torch import nn

from moesaic.core.errors import ConversionError
from moesaic.interop.common import HF_ARCHITECTURES
from moesaic.interop.mapping import Copy, Layout


def _layout(model: nn.Module) -> Layout:
    cfg: Any = getattr(model, "cfg", None)
    if getattr(cfg, "kind", None) == "decoder_lm":
        from moesaic.interop.hf import hf_config

        a, hf_cfg = hf_config(model)
        return a.layout(hf_cfg, "per_expert")
    info = getattr(model, "hf_info", None) or {}
    if "arch" not in info or cfg is None:
        raise ConversionError(f"{type(model).__name__}: no Hugging Face architecture known for this model")
    import transformers

    arch: Any = HF_ARCHITECTURES.get(info["arch"])
    if getattr(arch, "encoder_layout", None) is None:
        raise ConversionError(f"{type(model).__name__}: architecture {info['arch']!r} has no encoder layout")
    hf_cfg = transformers.CONFIG_MAPPING[arch.model_type](**arch.to_hf(cfg))
    return arch.encoder_layout(hf_cfg, cfg.pooler)


def hf_module_names(model: nn.Module) -> dict[str, str]:
    """moesaic module name -> transformers module name, for every weight copied one to one."""
    out = {}
    for r in _layout(model).rules:
        if isinstance(r.op, Copy) and r.moesaic_key.endswith(".weight") and r.hf_keys[0].endswith(".weight"):
            out[r.moesaic_key.removesuffix(".weight")] = r.hf_keys[0].removesuffix(".weight")
    return out
