"""Declared weight layouts and the engine that applies them in both directions, checking completeness.

An architecture declares, for a given config, a :class:`Layout`: a list of :class:`Rule` (Hugging Face keys
-> one moesaic key, through an invertible :class:`Op`), the source keys it ignores on purpose (with the
reason) and the moesaic tensors that are not weights (training state such as the aux-loss-free load
counter). Nothing is guessed from names or shapes: a layout that does not fit the checkpoint exactly is an
error, never a silent skip.

:func:`import_weights` enforces the conversion contract of docs/hf.md (Safety rules):
every target tensor is written exactly once, every source tensor is used exactly once or explicitly
ignored, every shape matches, and a weight-layout tag in the file metadata must agree with the declared
``out,in`` orientation. All violations are collected and raised as one :class:`ConversionError` listing
the keys. :func:`export_weights` is the inverse and applies the same bookkeeping to the moesaic side.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moesaic.core.errors import ConversionError
from moesaic.interop.safetensors_io import WeightReader, short_list
from moesaic.train.lazy_load import lazy_state
from moesaic.train.stream_safetensors import LazyTensor

#: Metadata tag that moesaic writes into every safetensors file it exports and checks on import: matrices
#: are stored ``[out, in]`` like ``nn.Linear`` (stacked experts ``[E, out, in]``). A square matrix stored
#: transposed cannot be told apart by its shape (transformers #47031), so the orientation is declared.
LAYOUT_TAG = "moesaic.weight_layout"
LAYOUT_VALUE = "out,in"


class Op:
    """An invertible map between ``n_in`` Hugging Face tensors and one moesaic tensor."""

    n_in = 1

    def to_ms(self, ts: Sequence[Tensor]) -> Tensor:
        return ts[0]

    def to_hf(self, t: Tensor) -> list[Tensor]:
        return [t]

    def __repr__(self) -> str:
        return type(self).__name__


class Copy(Op):
    """One tensor, unchanged."""


@dataclasses.dataclass(frozen=True, repr=False)
class StackExperts(Op):
    """``E`` per-expert ``[out, in]`` matrices <-> one stacked ``[E, out, in]`` tensor (down projections)."""

    num_experts: int

    @property
    def n_in(self) -> int:  # type: ignore[override]
        return self.num_experts

    def to_ms(self, ts: Sequence[Tensor]) -> Tensor:
        return torch.stack(list(ts), 0)

    def to_hf(self, t: Tensor) -> list[Tensor]:
        return [x.clone() for x in t.unbind(0)]


@dataclasses.dataclass(frozen=True, repr=False)
class StackGatedExperts(Op):
    """``E`` gate then ``E`` up matrices ``[F, D]`` <-> ``w_up_EHD`` ``[E, 2F, D]`` with the gate rows first
    (the order of transformers 5's fused ``gate_up_proj``; swapping it is the TransformerLens #1668 bug)."""

    num_experts: int

    @property
    def n_in(self) -> int:  # type: ignore[override]
        return 2 * self.num_experts

    def to_ms(self, ts: Sequence[Tensor]) -> Tensor:
        E = self.num_experts
        return torch.stack([torch.cat((ts[e], ts[E + e]), 0) for e in range(E)], 0)

    def to_hf(self, t: Tensor) -> list[Tensor]:
        F = t.shape[1] // 2
        return [x[:F].clone() for x in t.unbind(0)] + [x[F:].clone() for x in t.unbind(0)]


@dataclasses.dataclass(frozen=True)
class Rule:
    """The Hugging Face tensors ``hf_keys`` make the moesaic tensor ``moesaic_key`` through ``op``."""

    hf_keys: tuple[str, ...]
    moesaic_key: str
    op: Op = dataclasses.field(default_factory=Copy)

    def __post_init__(self) -> None:
        if len(self.hf_keys) != self.op.n_in:
            raise ValueError(f"rule for {self.moesaic_key}: {self.op!r} takes {self.op.n_in} tensors, "
                             f"got {len(self.hf_keys)}")


def copy_rule(hf_name: str, moesaic_name: str | None = None) -> Rule:
    """One Hugging Face tensor copied unchanged to one moesaic parameter (of the same name by default)."""
    return Rule((hf_name,), moesaic_name if moesaic_name is not None else hf_name)


@dataclasses.dataclass
class Layout:
    """What one architecture's checkpoint holds for one config, and where each tensor goes."""

    name: str
    rules: list[Rule]
    #: (regex over HF keys, reason): source tensors that are deliberately not converted.
    ignore_hf: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: regexes over moesaic keys that are state, not weights (left at their initial value on import).
    not_weights_ms: list[str] = dataclasses.field(default_factory=lambda: [r"\.step_load$"])

    def ignored(self, key: str) -> bool:
        return any(re.search(p, key) for p, _ in self.ignore_hf)

    def not_weight(self, key: str) -> bool:
        return any(re.search(p, key) for p in self.not_weights_ms)


def _targets(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Persistent state of ``model`` by name and a canonical name per tensor (tied weights share one)."""
    state = model.state_dict(keep_vars=True)
    canon: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, t in state.items():
        canon[name] = first.setdefault(id(t), name)
    return state, canon


def _raise(title: str, problems: dict[str, list[str]]) -> None:
    parts = [f"{what} ({len(keys)}): {short_list(keys)}" for what, keys in problems.items() if keys]
    if parts:
        raise ConversionError(f"{title}: " + "; ".join(parts))


def _shape(reader: WeightReader, key: str) -> tuple[int, ...]:
    return tuple(reader.shape(key)) if hasattr(reader, "shape") else tuple(reader.get(key).shape)


def _read_rule(reader: WeightReader, r: Rule, dtype: torch.dtype) -> Tensor:
    """The moesaic tensor of rule ``r``, its source tensors read now (each file opened for this read only)."""
    read = getattr(reader, "read", reader.get)
    return r.op.to_ms([read(k) for k in r.hf_keys]).to(dtype)


def import_weights(model: nn.Module, reader: WeightReader, layout: Layout) -> None:
    """Write the checkpoint into ``model`` through ``layout``; raise one ConversionError listing every problem.

    A model built on the meta device is filled lazily: each target tensor becomes a
    :class:`~moesaic.train.stream_safetensors.LazyTensor` in ``model.lazy_state`` that reads its source
    tensors when it is made (the same checks run first, on shapes only; docs/convert.md, "Streaming")."""
    state, canon = _targets(model)
    used: Counter[str] = Counter()
    written: Counter[str] = Counter()
    missing, shapes, unknown, tagged = [], [], [], []
    for r in layout.rules:
        miss = [k for k in r.hf_keys if k not in reader]
        if miss:
            missing += miss
            continue
        used.update(r.hf_keys)
        if r.moesaic_key not in state:
            unknown.append(r.moesaic_key)
            continue
        bad_tag = [k for k in r.hf_keys if reader.file_metadata(k).get(LAYOUT_TAG, LAYOUT_VALUE) != LAYOUT_VALUE]
        if bad_tag:
            tagged += [f"{k} ({LAYOUT_TAG}={reader.file_metadata(k)[LAYOUT_TAG]})" for k in bad_tag]
            continue
        target = state[r.moesaic_key]
        tensors = ([torch.empty(_shape(reader, k), device="meta") for k in r.hf_keys] if target.is_meta
                   else [reader.get(k) for k in r.hf_keys])
        if len({t.shape for t in tensors}) > 1 and not isinstance(r.op, Copy):
            shapes.append(f"{r.moesaic_key} <- {', '.join(f'{k} {list(t.shape)}' for k, t in zip(r.hf_keys, tensors))}")
            continue
        value = r.op.to_ms(tensors)
        if tuple(value.shape) != tuple(target.shape):
            src = r.hf_keys[0] if len(r.hf_keys) == 1 else f"{r.hf_keys[0]} (+{len(r.hf_keys) - 1})"
            shapes.append(f"{src} {list(tensors[0].shape)} -> {r.moesaic_key} got {list(value.shape)}, "
                          f"expected {list(target.shape)}")
            continue
        if target.is_meta:  # a model built on the meta device: read the tensors when they are needed
            lazy_state(model)[canon[r.moesaic_key]] = LazyTensor(tuple(target.shape), target.dtype,
                                                                 functools.partial(_read_rule, reader, r, target.dtype))
        else:
            with torch.no_grad():
                target.copy_(value.to(target.dtype))
        written[canon[r.moesaic_key]] += 1
    unused = [k for k in reader.keys() if not used[k] and not layout.ignored(k)]
    reused = [k for k, c in used.items() if c > 1]
    never = sorted({c for n, c in canon.items() if not written[c] and not layout.not_weight(n)})
    twice = [k for k, c in written.items() if c > 1]
    _raise(f"cannot import {reader.folder} as {layout.name}", {
        "missing tensors": missing, "shape mismatch": shapes, "weight layout tag is not 'out,in'": tagged,
        "source tensors neither used nor ignored": unused, "source tensors used twice": reused,
        "targets not in the model": unknown, "model tensors never written": never,
        "model tensors written twice": twice})


def export_weights(model: nn.Module, layout: Layout) -> dict[str, Tensor]:
    """The Hugging Face state dict of ``model`` through ``layout`` (inverse of :func:`import_weights`)."""
    state, canon = _targets(model)
    out: dict[str, Tensor] = {}
    consumed: Counter[str] = Counter()
    unknown, twice = [], []
    for r in layout.rules:
        if r.moesaic_key not in state:
            unknown.append(r.moesaic_key)
            continue
        consumed[canon[r.moesaic_key]] += 1
        for k, t in zip(r.hf_keys, r.op.to_hf(state[r.moesaic_key].detach())):
            if k in out:
                twice.append(k)
            out[k] = t
    never = sorted({c for n, c in canon.items() if not consumed[c] and not layout.not_weight(n)})
    _raise(f"cannot export to {layout.name}", {
        "layout names tensors the model lacks": unknown, "model tensors not exported": never,
        "HF tensors written twice": twice})
    return out
