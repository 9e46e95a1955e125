"""Streaming sparse upcycling (``moesaic convert upcycle --set stream=true``): neither the input model nor
the upcycled expert stacks are held in memory. The input is a skeleton on the meta device whose tensors stay
in their safetensors files (``moesaic.load(path, lazy=True)``, :mod:`moesaic.train.lazy_load`); each
tensor of the output is made when the checkpoint writer reaches it (:mod:`moesaic.train.stream_safetensors`):
a copied tensor is read from its shard, an expert stack is made from the dense FFN read for it. Peak
memory is about one expert stack plus one dense FFN, so a model larger than memory converts.

Sparse upcycling: Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints"; drop-upcycling: Nakamura et al. 2025. The MoE layer is built on the meta device, its router
for real (a few rows, initialised by the verb); ``model.lazy_state`` maps each expert tensor's state-dict
name to a :class:`~moesaic.train.stream_safetensors.LazyTensor` that stacks the copies (or fine-grained
segments) of the dense FFN and, with drop-upcycling, re-draws their neurons from the generator state the
layer had in the verb, so the output equals the in-memory conversion bit for bit. The model cannot run
until it is saved and loaded again.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.layer import MoEConfig, MoELayer
from moesaic.train.lazy_load import LazyState, lazy_state, materialise, saved_names, value
from moesaic.train.stream_safetensors import LazyTensor
from moesaic.transforms.upcycle_init import drop_expert_

SegmentFn = Callable[[Sequence[DenseFFN], int, int], dict[str, Tensor]]


@dataclasses.dataclass(frozen=True)
class Source:
    """One input's dense FFN: the module (meta or real), its state-dict path and its model's lazy tensors."""

    ffn: DenseFFN
    path: str
    state: LazyState

    def real(self) -> DenseFFN:
        return cast(DenseFFN, materialise(self.ffn, self.path, self.state))


@dataclasses.dataclass(frozen=True)
class Drop:
    """Drop-upcycling of one layer: ``n`` neurons per expert, re-drawn from ``gen_state`` (experts in order)."""

    n: int
    gen_state: Tensor


@torch.no_grad()
def _stack(sources: Sequence[Source], segment: SegmentFn, granularity: int, E: int, name: str,
           lt: tuple[tuple[int, ...], torch.dtype], drop: Drop | None) -> Tensor:
    """The expert stack ``name`` of one layer, made now from the sources' dense FFNs."""
    srcs = [s.real() for s in sources]
    out = torch.empty(lt[0], dtype=lt[1])
    gen = torch.Generator()
    if drop is not None:
        gen.set_state(drop.gen_state)
    for i in range(E):
        seg = segment(srcs, i, granularity)
        if drop is not None:  # the whole expert is re-drawn, so the generator advances as in drop_reinit_
            seg = {**seg, "w_up_EHD": seg["w_up_EHD"].clone(), "w_down_EDF": seg["w_down_EDF"].clone()}
            drop_expert_(seg["w_up_EHD"], seg["w_down_EDF"], drop.n, gen)
        out[i] = seg[name]
    return out


def streamed_layer(model: nn.Module, moe: MoEConfig, sources: Sequence[Source], granularity: int, causal: bool,
                   segment: SegmentFn, drop: Drop | None = None) -> MoELayer:
    """An MoE layer with meta experts and a real router (on the CPU when the input is on meta, random rows
    of its own init: the verb sets them); registers the experts' producers in ``model.lazy_state`` under
    ``{path}.experts.{name}``."""
    ref = sources[0].ffn.down_proj.weight
    d_model = sources[0].ffn.d_model
    with torch.device("meta"):
        layer = moe.build(d_model, causal=causal)
    layer.router = moe.router.build(d_model, layer.num_experts, layer.top_k, causal=causal).to(
        device="cpu" if ref.is_meta else ref.device, dtype=ref.dtype)
    lazy = lazy_state(model)
    E = layer.experts.num_experts
    for name, p in layer.experts.named_parameters():
        shape = tuple(p.shape)
        make = functools.partial(_stack, tuple(sources), segment, granularity, E, name, (shape, ref.dtype), drop)
        lazy[f"{sources[0].path}.experts.{name}"] = LazyTensor(shape, ref.dtype, make)
    return layer


@torch.no_grad()
def replay_drop_(layer: MoELayer, n: int, gen: torch.Generator) -> None:
    """Advance ``gen`` past a streamed layer's drop-upcycling re-draws (replayed on zeros of one expert's
    shapes: the draws depend on the shapes only), so the next layer draws what it draws in memory."""
    p = dict(layer.experts.named_parameters())
    for _ in range(layer.num_experts):
        drop_expert_(torch.zeros(p["w_up_EHD"].shape[1:]), torch.zeros(p["w_down_EDF"].shape[1:]), n, gen)


def _mean(makers: Sequence[Callable[[], Tensor]]) -> Tensor:
    vals = [make() for make in makers]
    return torch.stack([vals[0], *(v.to(vals[0].dtype) for v in vals[1:])]).mean(0)


def average_lazily_(model: nn.Module, others: Sequence[nn.Module], names: Sequence[str]) -> None:
    """BAM / Branch-Train-MiX on a streamed model: the tensors ``names`` become the mean over the inputs,
    computed when written."""
    lazy = lazy_state(model)
    for n in names:
        lt = lazy[n]
        makers: list[Callable[[], Tensor]] = [lt.make, *(functools.partial(value, o, n) for o in others)]
        lazy[n] = LazyTensor(lt.shape, lt.dtype, functools.partial(_mean, makers))


def streamed_state(model: nn.Module) -> dict[str, Any]:
    """The state to save: lazy tensors where registered, the other tensors as they are (on the CPU), tied
    tensors once; a meta tensor without a producer is a bug in the verb."""
    from moesaic.core.errors import ConversionError

    lazy: LazyState = getattr(model, "lazy_state", {})
    keep = saved_names(model)
    state: dict[str, Any] = {}
    for n, t in model.state_dict().items():
        if n not in keep:
            continue
        if n in lazy:
            state[n] = lazy[n]
        elif t.is_meta:
            raise ConversionError(f"{n}: a streamed tensor without a producer; nothing was written")
        else:
            state[n] = t.detach().to("cpu").contiguous()
    return state
