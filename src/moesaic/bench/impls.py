"""The implementations that ``moesaic bench layer`` times: moesaic backends, two floors, and peers.

Every implementation is a :class:`Impl`: ``run(x_TD) -> y_TD`` on ``[T, D]`` input, its trainable
``params`` and a ``family`` that says which routing/combine semantics it has (``mixtral``: softmax top-k,
renormalised weights; ``olmoe``: not renormalised; ``qwen2``: not renormalised plus a sigmoid-gated
shared expert; ``floor``: no router at all). Implementations of one family get identical weights
(copied from the family's moesaic layer) so their outputs must agree; the floors only set a scale:

* ``limit``: one dense SwiGLU FFN (expert 0's weights) over ``T*k`` rows: a router and dispatch with zero
  cost and perfectly efficient matmuls;
* ``balanced floor``: the ``E`` expert FFNs on perfectly balanced, pre-sorted slices of ``T*k`` rows: no
  routing, no dispatch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import moesaic
from moesaic.moe.experts.backends import BACKENDS
from moesaic.moe.layer import MoELayer


@dataclasses.dataclass
class Impl:
    name: str
    family: str
    run: Callable[[Tensor], Tensor]
    params: list[nn.Parameter]
    note: str = ""
    timed: bool = True  # False: built only as the reference of its family's output check


def moesaic_layer(D: int, Fd: int, E: int, k: int, backend: str, family: str = "mixtral") -> MoELayer:
    opts: dict[str, Any] = {"experts": {"kind": "glu", "backend": backend},
                  "router": {"kind": "topk", "normalization": "renorm" if family == "mixtral" else "none",
                             "aux_loss_coef": 0.0}}
    if family == "qwen2":
        opts["shared_experts"] = {"num": 1, "gate": "sigmoid"}
    return moesaic.moe_layer(D, Fd, E, k, **opts)


def moesaic_impls(D: int, Fd: int, E: int, k: int, backends: list[str] | None = None, family: str = "mixtral",
                  seed: int = 0) -> list[Impl]:
    """The family's ``loop`` layer first (the reference; ``timed`` only if listed), then ``backends``."""
    torch.manual_seed(seed)
    ref = moesaic_layer(D, Fd, E, k, "loop", family)
    backends = ["auto", *BACKENDS.names()] if backends is None else backends
    suffix = "" if family == "mixtral" else f" ({family})"
    out = [Impl(f"moesaic loop{suffix}", family, ref, list(ref.parameters()), timed="loop" in backends)]
    for b in backends:
        if b == "loop":
            continue
        layer = moesaic_layer(D, Fd, E, k, b, family)
        layer.load_state_dict(ref.state_dict())
        out.append(Impl(f"moesaic {b}{suffix}", family, layer, list(layer.parameters())))
    return out


def floor_impls(D: int, Fd: int, E: int, k: int, T: int) -> list[Impl]:
    """The limit and the balanced floor; their input is a fixed ``[T*k, D]`` leaf, not ``x_TD``."""
    torch.manual_seed(1)
    w_up = nn.Parameter(torch.randn(E, 2 * Fd, D) / D**0.5)
    w_down = nn.Parameter(torch.randn(E, D, Fd) / Fd**0.5)
    N = T * k
    rows = torch.randn(N, D)
    bounds = [N * e // E for e in range(E + 1)]

    up0, down0 = nn.Parameter(w_up.detach()[0].clone()), nn.Parameter(w_down.detach()[0].clone())

    def ffn(x: Tensor, up: Tensor, down: Tensor) -> Tensor:
        g, u = F.linear(x, up).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, down)

    def limit(x_TD: Tensor) -> Tensor:
        x = rows.to(x_TD.dtype).requires_grad_(x_TD.requires_grad)
        return ffn(x, up0, down0)

    def balanced(x_TD: Tensor) -> Tensor:
        x = rows.to(x_TD.dtype).requires_grad_(x_TD.requires_grad)
        # unbind/split once: indexing w[e] or slicing x per expert would allocate a full-size zero
        # gradient per expert in backward (E^2 memory traffic)
        ups, downs = w_up.unbind(0), w_down.unbind(0)
        xs = x.split([bounds[e + 1] - bounds[e] for e in range(E)])
        return torch.cat([ffn(xs[e], ups[e], downs[e]) for e in range(E)])

    return [Impl("limit", "floor", limit, [up0, down0], "dense SwiGLU over T*k rows"),
            Impl("balanced floor", "floor", balanced, [w_up, w_down], "E FFNs on balanced sorted slices")]


def _copy_into_hf(block: Any, layer: MoELayer) -> None:
    """``block``: one of the transformers MoE blocks below (they share no base class naming these parts)."""
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(layer.experts.w_up_EHD)
        block.experts.down_proj.copy_(layer.experts.w_down_EDF)
        if hasattr(block, "shared_expert"):
            assert layer.shared_gate is not None  # the qwen2 family's moesaic layer has a sigmoid-gated shared expert
            for n in ("gate_proj", "up_proj", "down_proj"):
                getattr(block.shared_expert, n).weight.copy_(getattr(layer.shared_experts, n).weight)
            block.shared_expert_gate.weight.copy_(layer.shared_gate.weight)


def peer_impls(D: int, Fd: int, E: int, k: int, refs: dict[str, MoELayer],
               wanted: Callable[[str], bool] = lambda name: True) -> tuple[list[Impl], str]:
    """transformers' Mixtral (eager and grouped_mm experts), Qwen2-MoE and OLMoE blocks (those ``wanted``), with
    the weights of the matching moesaic layer. Returns ``([], reason)`` when transformers is not installed."""
    try:
        import transformers
        from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock
        from transformers.models.olmoe.modeling_olmoe import OlmoeConfig, OlmoeSparseMoeBlock
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
    except ImportError as e:  # the `bench` extra is not installed
        return [], f"transformers peers skipped: {e}"
    common: dict[str, Any] = dict(hidden_size=D, num_experts_per_tok=k, hidden_act="silu")
    specs = [
        ("mixtral", "eager", MixtralSparseMoeBlock,
         MixtralConfig(intermediate_size=Fd, num_local_experts=E, router_jitter_noise=0.0, **common)),
        ("mixtral", "grouped_mm", MixtralSparseMoeBlock,
         MixtralConfig(intermediate_size=Fd, num_local_experts=E, router_jitter_noise=0.0, **common)),
        ("qwen2", "eager", Qwen2MoeSparseMoeBlock,
         Qwen2MoeConfig(moe_intermediate_size=Fd, shared_expert_intermediate_size=Fd, num_experts=E,
                        norm_topk_prob=False, **common)),
        ("olmoe", "eager", OlmoeSparseMoeBlock,
         OlmoeConfig(intermediate_size=Fd, num_experts=E, norm_topk_prob=False, **common)),
    ]
    out = []
    for family, impl, cls, cfg in specs:
        label = {"mixtral": "Mixtral", "qwen2": "Qwen2-MoE", "olmoe": "OLMoE"}[family]
        name = f"transformers {label} {impl}"
        if not wanted(name):
            continue
        cfg._experts_implementation = impl
        block = cls(cfg)
        _copy_into_hf(block, refs[family])
        run = (lambda b: lambda x: b(x.unsqueeze(0)).squeeze(0))(block)
        out.append(Impl(name, family, run, list(block.parameters()), f"transformers {transformers.__version__}"))
    return out, ""
