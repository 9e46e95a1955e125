"""Streaming sparse upcycling (``moesaic convert upcycle --set stream=true``): the expert stacks of the
upcycled layers are never held in memory; each is made from the dense FFN when the checkpoint writer
reaches it (:mod:`moesaic.train.stream_safetensors`), so a model whose upcycled size exceeds memory converts.

Sparse upcycling: Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints". The MoE layer is built on the meta device (no memory), its router is built for real (a few
rows); ``model.lazy_state`` maps each expert tensor's state-dict name to a
:class:`~moesaic.train.stream_safetensors.LazyTensor` that stacks the copies (or fine-grained segments) of
the dense FFN. The model itself cannot run until it is saved and loaded again (its experts are on meta).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.layer import MoEConfig, MoELayer
from moesaic.train.stream_safetensors import LazyTensor

SegmentFn = Callable[[Sequence[DenseFFN], int, int], dict[str, Tensor]]


def streamed_layer(model: nn.Module, moe: MoEConfig, path: str, srcs: Sequence[DenseFFN], granularity: int,
                   causal: bool, segment: SegmentFn) -> MoELayer:
    """An MoE layer with meta experts and a real router; registers the experts' producers in
    ``model.lazy_state`` under ``{path}.experts.{name}``."""
    ref = srcs[0].down_proj.weight
    d_model = srcs[0].d_model
    with torch.device("meta"):
        layer = moe.build(d_model, causal=causal)
    layer.router = moe.router.build(d_model, layer.num_experts, layer.top_k, causal=causal).to(
        device=ref.device, dtype=ref.dtype)
    lazy: dict[str, LazyTensor] = model.__dict__.setdefault("lazy_state", {})
    E = layer.experts.num_experts
    for name, p in layer.experts.named_parameters():
        def make(name: str = name) -> Tensor:
            with torch.no_grad():
                return torch.stack([segment(srcs, i, granularity)[name] for i in range(E)]).to(ref.dtype)

        lazy[f"{path}.experts.{name}"] = LazyTensor(tuple(p.shape), ref.dtype, make)
    return layer


def streamed_state(model: nn.Module, keep: set[str]) -> dict[str, Any]:
    """The state to save: lazy expert stacks where registered, the other tensors as they are (on the CPU);
    a meta tensor without a producer is a bug in the verb."""
    from moesaic.core.errors import ConversionError

    lazy: dict[str, LazyTensor] = getattr(model, "lazy_state", {})
    state: dict[str, Any] = {}
    for n, t in model.state_dict().items():
        if n in lazy:  # meta tensors share one address: tie detection cannot see them, they are never tied
            state[n] = lazy[n]
        elif n not in keep:
            continue
        elif t.is_meta:
            raise ConversionError(f"{n}: a streamed tensor without a producer; nothing was written")
        else:
            state[n] = t.detach().to("cpu").contiguous()
    return state
