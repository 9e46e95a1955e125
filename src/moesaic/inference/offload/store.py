"""Expert stores: where the weights of offloaded experts live (docs/inference.md, "Offloaded experts").

A store holds, for each MoE layer (by module path), each expert's tensors as the experts interface names
them (``expert_state(e)``: ``w_up_EHD[e]`` ``[H, D]``, ``w_down_EDF[e]`` ``[D, F]``), and copies one expert
into a cache slot on request (:meth:`ExpertStore.read_into`, returning the bytes it read). Tiers:

* :class:`MemoryStore` (``tier="cpu"`` or ``"device"``): the stacked tensors in RAM or device memory
  (the model's parameters are moved out of the model, not copied);
* :class:`moesaic.inference.offload.disk.DiskStore` (``tier="disk"``): one safetensors file per layer,
  read through a memory map, with a manifest of sha256 hashes (written by
  :func:`moesaic.inference.offload.disk.save_expert_store`).

Storing experts outside the accelerator and loading the ones a token needs is the setting of
mixtral-offloading (Eliseev & Mazur 2023), MoE-Infinity (Xue et al. 2024), EdgeMoE (Yi et al. 2023) and
Pre-gated MoE (Hwang et al. 2024).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from moesaic.core.errors import ConfigError
from moesaic.inference.offload.mapped import MappedSlots

#: A cache's slots: one ``[capacity, *shape]`` buffer per tensor name, or slots mapping a disk store's pages.
Slots = dict[str, Tensor] | MappedSlots


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer's experts: count, tensor names (in ``stacked_names()`` order), per-expert shapes, dtype."""

    name: str
    num_experts: int
    shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert's tensors."""
        size = torch.empty((), dtype=self.dtype).element_size()
        total = 0
        for s in self.shapes.values():
            n = 1
            for d in s:
                n *= d
            total += n * size
        return total


class ExpertStore:
    """Base class: per-layer :class:`LayerSpec` and reading one expert into preallocated tensors."""

    tier: str = ""

    def __init__(self, specs: dict[str, LayerSpec]):
        self.specs = specs

    def spec(self, layer: str) -> LayerSpec:
        """The layer's spec; :class:`ConfigError` naming the layer when the store does not hold it."""
        if layer not in self.specs:
            raise ConfigError("store.layers", layer, f"this {self.tier} store holds no experts for it; it holds "
                                                     f"{', '.join(self.specs) or 'none'}")
        return self.specs[layer]

    def read_into(self, layer: str, e: int, out: dict[str, Tensor]) -> int:
        """Copy expert e of ``layer`` into ``out`` (name -> tensor of the expert's shape); the bytes read."""
        raise NotImplementedError  # abstract: every tier implements it

    def new_slots(self, layer: str, capacity: int, device: torch.device | str, zero_copy: bool = True) -> Slots:
        """``capacity`` empty slots for ``layer``'s experts on ``device`` (a memory tier copies into them;
        :class:`moesaic.inference.offload.disk.DiskStore` may map its file pages instead)."""
        spec = self.spec(layer)
        return {n: torch.empty((capacity, *shape), dtype=spec.dtype, device=device) for n, shape in spec.shapes.items()}

    def load_slot(self, layer: str, e: int, slots: Slots, slot: int, ahead: bool = False) -> int:
        """Put expert e of ``layer`` into ``slot`` of ``slots`` (made by :meth:`new_slots`); the bytes read.
        ``ahead``: a prefetch, loaded before it is needed (mapped slots then only start the read)."""
        assert isinstance(slots, dict), "mapped slots come from a disk store"
        return self.read_into(layer, e, {n: b[slot] for n, b in slots.items()})

    def nbytes(self) -> int:
        """Bytes of all experts in the store."""
        return sum(s.expert_nbytes * s.num_experts for s in self.specs.values())

    def close(self) -> None:
        """Release files and maps (memory tiers hold nothing to release)."""


class MemoryStore(ExpertStore):
    """Experts held as stacked tensors ``[E, ...]`` in CPU RAM (``tier="cpu"``) or device memory (``"device"``)."""

    def __init__(self, tensors: dict[str, dict[str, Tensor]], tier: str = "cpu"):
        if tier not in ("cpu", "device"):
            raise ConfigError("store.tier", tier, "a memory store is cpu or device")
        self.tier = tier
        self.tensors = tensors
        specs = {}
        for layer, named in tensors.items():
            first = next(iter(named.values()))
            specs[layer] = LayerSpec(layer, first.shape[0], {n: tuple(t.shape[1:]) for n, t in named.items()},
                                     first.dtype)
        super().__init__(specs)

    def read_into(self, layer: str, e: int, out: dict[str, Tensor]) -> int:
        spec = self.spec(layer)
        if not 0 <= e < spec.num_experts:
            raise ConfigError(f"{layer}.expert", e, f"must be in [0, {spec.num_experts})")
        n = 0
        for name, dst in out.items():
            src = self.tensors[layer][name][e]
            dst.copy_(src)
            n += src.numel() * src.element_size()
        return n
