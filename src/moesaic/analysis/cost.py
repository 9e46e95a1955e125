"""What an MoE layer costs, per layer: FLOPs, bytes moved and operational intensity, against this
machine's measured matmul peak and memory bandwidth (a roofline; Williams et al. 2009), compared with the
layer's measured time. The accounting follows the MoE cost models of Duplex and Edge-MoE: an MoE layer is
memory-bound when few tokens reach each expert, because every expert that receives a token is read whole.

Per forward of ``T`` tokens with ``A`` assignments (``k`` per token) and ``U`` distinct experts used:

* FLOPs = ``2 * A * P_e`` (each assignment multiplies by one expert's ``P_e`` weights) + ``2 * T * D * E``
  (router) + ``2 * T * P_s`` (shared experts, ``P_s`` weights);
* bytes = weights read (``U * P_e + D * E + P_s``, 4 bytes each in fp32) + activations: the input read
  once, each assignment's row gathered and its output row written and summed (``3 * A * D``), the
  expert hidden activations written and read (``2 * A * H``, ``H`` the width after the up projection),
  the output written (``T * D``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import Tensor

from moesaic.moe.layer import MoELayer


def _median_seconds(fn: Any, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_peaks(n: int = 1024, mb: int = 256) -> dict[str, float]:
    """Measured fp32 matmul FLOP/s (``n x n x n``) and copy bandwidth (bytes read + written per second,
    ``mb`` MiB buffers), at the current torch thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemm = _median_seconds(lambda: torch.mm(a, b))
    src = torch.empty(mb * 2**20 // 4).uniform_()
    dst = torch.empty_like(src)
    copy = _median_seconds(lambda: dst.copy_(src))
    return {"peak_flops": 2 * n**3 / gemm, "bandwidth_bytes": 2 * src.numel() * 4 / copy,
            "threads": float(torch.get_num_threads())}


def _numel(tensors: Any) -> int:
    return sum(int(t.numel()) for t in tensors)


def layer_cost(layer: MoELayer, tokens: int, assignments: int, experts_used: int) -> dict[str, float]:
    """FLOPs, bytes and operational intensity of one forward (the formulas of the module docstring)."""
    state = layer.experts.expert_state(0)
    P_e = _numel(state.values())
    H = sum(int(t.shape[0]) for n, t in state.items() if t.dim() == 2 and "down" not in n and "w2" not in n)
    P_s = _numel(layer.shared_experts.parameters()) if layer.shared_experts is not None else 0
    D, E = layer.d_model, layer.num_experts
    flops = 2.0 * assignments * P_e + 2.0 * tokens * D * E + 2.0 * tokens * P_s
    weights = experts_used * P_e + D * E + P_s
    acts = tokens * D + 3 * assignments * D + 2 * assignments * H + tokens * D
    nbytes = 4.0 * (weights + acts)
    return {"flops": flops, "bytes": nbytes, "intensity": flops / nbytes, "weight_bytes": 4.0 * weights,
            "activation_bytes": 4.0 * acts}


@torch.no_grad()
def measure_layers(layers: dict[str, MoELayer], inputs: dict[str, Tensor], peaks: dict[str, float]
                   ) -> dict[str, dict[str, float]]:
    """Per layer: its cost on the recorded input batch, the roofline time bound
    ``max(flops / peak, bytes / bandwidth)`` and the measured forward time (median of 5)."""
    out = {}
    for name, layer in layers.items():
        x = inputs.get(name)
        if x is None:
            continue
        seen: dict[str, Any] = {}

        def keep(_layer: MoELayer, decision: Any, _plan: Any, seen: dict[str, Any] = seen) -> None:
            seen.setdefault("d", decision)

        handle = layer.register_routing_hook(keep)
        try:
            seconds = _median_seconds(lambda layer=layer, x=x: layer(x))
        finally:
            handle.remove()
        d = seen["d"]
        used = int(torch.unique(d.expert_idx_N).numel())
        c = layer_cost(layer, int(d.num_tokens), int(d.num_assignments), used)
        bound = max(c["flops"] / peaks["peak_flops"], c["bytes"] / peaks["bandwidth_bytes"])
        out[name] = {**c, "tokens": float(d.num_tokens), "experts_used": float(used), "measured_s": seconds,
                     "roofline_s": bound, "achieved_flops": c["flops"] / seconds,
                     "fraction_of_roofline": bound / seconds}
    return out
