"""Dynamic k at inference: run the MoE layers of a trained model with another number of active experts per
token (SMoE-Dropout, Chen et al. 2023, "Sparse MoE as the New Dropout": a model trained with a varying k
can be run at any k; here k is an inference-time override of any top-k router).

``handle = set_top_k_(model, 2)`` (every MoE layer) or ``set_top_k_(model, {1: 4, 3: 2})`` (by layer
index, as in ``model.layers.N``); ``handle.restore()`` puts the trained k back. The override sets the
router's, the dispatcher's and the layer's ``top_k`` (the routed k: with fine-grained segmentation it
counts segments, ``top_k * granularity``); nothing in the layer's forward changes, so k unchanged is
bit-exact. k outside ``[1, num_experts]``, or a router defined for one k only (Switch, GShard), is a
``ConfigError`` naming the layer.
"""

from __future__ import annotations

from torch import nn

from moesaic.core.errors import ConfigError
from moesaic.moe.layer import MoELayer


def moe_layers_by_index(model: nn.Module) -> dict[int, MoELayer]:
    """``{i: MoE layer}`` for ``model.layers.i.mlp`` (or any MoE layer, numbered in module order)."""
    found: dict[int, MoELayer] = {}
    for name, m in model.named_modules():
        if isinstance(m, MoELayer):
            parts = name.split(".")
            idx = next((int(parts[j + 1]) for j in range(len(parts) - 1)
                        if parts[j] == "layers" and parts[j + 1].isdigit()), len(found))
            found[idx] = m
    return found


class TopKHandle:
    def __init__(self, saved: list[tuple[MoELayer, int]]):
        self.saved = saved

    def restore(self) -> None:
        for layer, k in self.saved:
            _set(layer, k)
        self.saved = []


def _set(layer: MoELayer, k: int) -> None:
    layer.top_k = k
    layer.router.top_k = k
    layer.dispatcher.top_k = k


def parse_top_k(specs: list[str]) -> int | dict[int, int]:
    """CLI form: ``K`` (every layer) or ``LAYER=K`` (repeatable)."""
    out: dict[int, int] = {}
    for s in specs:
        layer, _, k = s.rpartition("=")
        try:
            kk, li = int(k), (int(layer) if layer else None)
        except ValueError:
            raise ConfigError("--top-k", s, "must be K or LAYER=K with integers") from None
        if li is None:
            if len(specs) > 1:
                raise ConfigError("--top-k", s, "a plain K applies to every layer; do not mix it with LAYER=K")
            return kk
        out[li] = kk
    return out


def set_top_k_(model: nn.Module, k: int | dict[int, int]) -> TopKHandle:
    """Override the routed k of every MoE layer (an int) or of the given layer indices (a dict)."""
    layers = moe_layers_by_index(model)
    if not layers:
        raise ConfigError("top_k", k, "the model has no MoE layer")
    want = {i: k for i in layers} if isinstance(k, int) else dict(k)
    for i, kk in want.items():
        if i not in layers:
            raise ConfigError(f"top_k.{i}", kk, f"layer {i} is not an MoE layer (MoE layers: {sorted(layers)})")
        layer = layers[i]
        if isinstance(kk, bool) or not isinstance(kk, int) or not 1 <= kk <= layer.num_experts:
            raise ConfigError(f"model.layers.{i}.mlp.top_k", kk, f"must be in [1, num_experts] = "
                                                              f"[1, {layer.num_experts}]")
        fixed = getattr(type(layer.router), "required_top_k", None)
        if fixed is not None and kk != fixed * layer.cfg.granularity:
            raise ConfigError(f"model.layers.{i}.mlp.top_k", kk, f"router {layer.cfg.router.kind!r} routes exactly "
                                                              f"top-{fixed}")
    saved = [(layers[i], layers[i].top_k) for i in want]
    for i, kk in want.items():
        _set(layers[i], kk)
    return TopKHandle(saved)
