"""Refuse a model that cannot fit in memory before allocating it.

The model is built on PyTorch's ``meta`` device (shapes only, no storage), its parameters counted, and the
training footprint estimated as weights + gradients + AdamW's two moments (4 copies at the training dtype;
Rajbhandari et al. 2020, "ZeRO", Sec. 3.1, count the same model states). That is compared with what this
process can still allocate: the smaller of ``MemAvailable`` and the headroom under ``RLIMIT_AS``. Activations
come on top, so passing is necessary, not sufficient; what it prevents is a config whose weights alone would
take the machine down (the kernel's OOM killer, or a ``MemoryError`` deep inside ``torch.empty``).
"""

from __future__ import annotations

import dataclasses
import resource
from pathlib import Path
from typing import Any

import torch

from moesaic.core.errors import ConfigError

#: Model states per parameter while training: weights, gradients, AdamW exp_avg and exp_avg_sq.
STATE_COPIES = 4


def _proc_kib(path: str, key: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes() -> int | None:
    """Bytes this process can still allocate (None when unknown)."""
    limits = []
    mem = _proc_kib("/proc/meminfo", "MemAvailable")
    if mem is not None:
        limits.append(mem * 1024)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = _proc_kib("/proc/self/status", "VmSize") or 0
        limits.append(max(0, soft - used * 1024))
    return min(limits) if limits else None


def count_parameters(model_cfg: Any) -> int | None:
    """Parameters of ``model_cfg.build()`` counted on the meta device; None if the model cannot be built there."""
    try:
        with torch.device("meta"):
            model = model_cfg.build()
    except (RuntimeError, NotImplementedError, TypeError):
        return None  # a model whose construction needs real data (it is then built, and checked, for real)
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def _huge_field(cfg: Any, path: str) -> tuple[str, int] | None:
    """The first integer field of the config tree ``cfg`` that no tensor size can hold (>= 2**62)."""
    if isinstance(cfg, bool):
        return None
    if isinstance(cfg, int):
        return (path, cfg) if abs(cfg) >= 2**62 else None
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        items: list[tuple[str, Any]] = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)]
    elif isinstance(cfg, dict):
        items = [(str(k), v) for k, v in cfg.items()]
    elif isinstance(cfg, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(cfg)]
    else:
        return None
    for name, v in items:
        hit = _huge_field(v, f"{path}.{name}")
        if hit is not None:
            return hit
    return None


def check_model_fits(model_cfg: Any, dtype: torch.dtype) -> None:
    """Raise :class:`ConfigError` on ``model`` when its training states exceed the memory left (or a size
    field is beyond what a tensor dimension can hold)."""
    huge = _huge_field(model_cfg, "model")
    if huge is not None:
        raise ConfigError(huge[0], None, f"an integer of {huge[1].bit_length()} bits is far beyond any tensor size "
                          "(the model could not be allocated)", show_value=False)
    n = count_parameters(model_cfg)
    avail = available_bytes()
    if n is None or avail is None:
        return
    need = n * STATE_COPIES * torch.empty((), dtype=dtype).element_size()
    if need > avail:
        raise ConfigError("model", f"{n:,} parameters", f"needs about {need / 2**30:.1f} GiB for weights, gradients "
                          f"and AdamW state; only {avail / 2**30:.1f} GiB is available", show_value=False)
