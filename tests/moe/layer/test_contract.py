"""Contract tests of the data path over every registered dispatcher, experts kind and backend, float64, small
shapes: every backend equals the ``loop`` reference (outputs and gradients), gradcheck of experts(x, plan),
capacity with a large factor equals sort, one expert equals the dense FFN."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.func import functional_call

import moesaic
from moesaic.core.types import DispatchPlan
from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.dispatch.base import DISPATCHERS
from moesaic.moe.experts.backends import BACKENDS
from moesaic.moe.experts.base import EXPERTS

D, F, E, T = 8, 16, 4, 12
BACKEND_NAMES = BACKENDS.names()

#: layer options per dispatcher kind: the router it pairs with
DISPATCH_OPTS: dict[str, dict[str, Any]] = {
    "sort": {"top_k": 2},
    "capacity": {"top_k": 2, "dispatcher": {"kind": "capacity", "capacity_factor": 0.75}},  # drops some
    "soft": {"top_k": 1, "router": {"kind": "soft_moe", "slots_per_expert": 2}, "dispatcher": {"kind": "soft"}},
}
#: layer options per experts kind (E and the router where a kind needs them)
EXPERTS_OPTS: dict[str, dict[str, Any]] = {
    "glu": {}, "mlp": {}, "mlp_bias": {}, "ewa": {}, "evomoe": {},
    "moepp": {"num_experts": 6, "router": {"kind": "moepp", "zero_computation_experts": 2},
              "experts": {"num_constant": 1, "num_copy": 1, "num_zero": 0}},
}


def test_every_registered_kind_has_a_contract_case():
    assert set(DISPATCHERS.names()) == set(DISPATCH_OPTS)
    assert set(EXPERTS.names()) == set(EXPERTS_OPTS)
    assert {"loop", "grouped_mm", "bmm", "active", "fused"} <= set(BACKEND_NAMES)


def build(dispatcher: str = "sort", kind: str = "glu", backend: str = "loop", seed: int = 0) -> moesaic.MoELayer:
    opts = {**DISPATCH_OPTS[dispatcher], **{k: v for k, v in EXPERTS_OPTS[kind].items() if k != "experts"}}
    num_experts = opts.pop("num_experts", E)
    top_k = opts.pop("top_k", 2)
    experts = {"kind": kind, "backend": backend, **EXPERTS_OPTS[kind].get("experts", {})}
    torch.manual_seed(seed)
    return moesaic.moe_layer(D, F, num_experts, top_k, experts=experts, **opts).double().eval()


def plan_and_input(layer: moesaic.MoELayer, seed: int = 1) -> tuple[torch.Tensor, DispatchPlan]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T // 2, D, dtype=torch.float64, generator=g)
    mask = torch.ones(2, T // 2, dtype=torch.bool)
    mask[1, -2:] = False  # padding: no rows, output 0
    with torch.no_grad():
        decision = layer.router(x.reshape(-1, D), mask.reshape(-1), seq_ids_T=torch.arange(2).repeat_interleave(T // 2))
    return x.reshape(-1, D), layer.dispatcher.plan(decision)


def experts_fn(layer: moesaic.MoELayer, plan: DispatchPlan, backend: str):
    """(x, weight_N, *expert params) -> y_TD, with the plan's combine weights as an input (sparse plans)."""
    names = [n for n, _ in layer.experts.named_parameters()]

    def f(x_TD: torch.Tensor, w_N: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        p = plan if plan.slots is not None else DispatchPlan(plan.token_idx_N, w_N, plan.counts_E, plan.num_tokens)
        return functional_call(layer.experts, dict(zip(names, params)), (x_TD, p), {"backend": backend})

    params = [p.detach().clone().requires_grad_() for _, p in layer.experts.named_parameters()]
    return f, params


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dispatcher", sorted(DISPATCH_OPTS))
def test_backend_equals_loop_and_passes_gradcheck(dispatcher, backend):
    layer = build(dispatcher)
    x_TD, plan = plan_and_input(layer)
    f, params = experts_fn(layer, plan, backend)
    f_ref, _ = experts_fn(layer, plan, "loop")
    inputs = (x_TD.clone().requires_grad_(), plan.weight_N.detach().clone().requires_grad_(), *params)
    y, y_ref = f(*inputs), f_ref(*inputs)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    g_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, g_out, allow_unused=True)
    grads_ref = torch.autograd.grad(f_ref(*inputs), inputs, g_out, allow_unused=True)
    for g, r in zip(grads, grads_ref):
        if r is None:  # soft plans: the weights are not an input
            continue
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("kind", sorted(EXPERTS_OPTS))
def test_experts_kind_equals_loop_and_passes_gradcheck(kind, backend):
    layer = build("sort", kind)
    x_TD, plan = plan_and_input(layer)
    f, params = experts_fn(layer, plan, backend)
    f_ref, _ = experts_fn(layer, plan, "loop")
    inputs = (x_TD.clone().requires_grad_(), plan.weight_N.detach().clone().requires_grad_(), *params)
    torch.testing.assert_close(f(*inputs), f_ref(*inputs), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_loop_reference_is_gather_expert_ffns_combine(backend):
    """The plan's meaning, spelled out: y_t = sum over t's rows n of w_n * FFN_{e(n)}(x_t)."""
    layer = build("capacity", backend=backend)
    x_TD, plan = plan_and_input(layer)
    ex = layer.experts
    expert_N = torch.arange(E).repeat_interleave(plan.counts_E)
    ref = torch.zeros_like(x_TD)
    for n in range(plan.num_rows):
        e, t = int(expert_N[n]), int(plan.token_idx_N[n])
        gate, up = ex.w_up_EHD[e, :F], ex.w_up_EHD[e, F:]
        ffn = (torch.nn.functional.silu(x_TD[t] @ gate.t()) * (x_TD[t] @ up.t())) @ ex.w_down_EDF[e].t()
        ref[t] += plan.weight_N[n] * ffn
    with torch.no_grad():
        torch.testing.assert_close(ex(x_TD, plan), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_capacity_with_a_large_factor_equals_sort(backend):
    sort = build("sort", backend=backend)
    cap = moesaic.moe_layer(D, F, E, 2, experts={"backend": backend},
                            dispatcher={"kind": "capacity", "capacity_factor": E / 2 + 1,
                                        "eval_capacity_factor": None}).double().eval()
    cap.load_state_dict(sort.state_dict())
    x = torch.randn(T, D, dtype=torch.float64)
    y_sort, y_cap = sort(x), cap(x)
    assert cap.last_stats["dropped"] == 0
    assert torch.equal(y_cap, y_sort)  # the same plan, so the same kernels on the same rows


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("kind,act", [("glu", "silu"), ("mlp", "gelu")])
def test_one_expert_equals_the_dense_ffn(kind, act, backend):
    layer = moesaic.moe_layer(D, F, 1, 1, router={"normalization": "none"},
                              experts={"kind": kind, "activation": act, "backend": backend}).double()
    gated = kind == "glu"
    ffn = DenseFFN(D, F, act, gated).double()
    w_up, w_down = layer.experts.w_up_EHD[0], layer.experts.w_down_EDF[0]
    with torch.no_grad():
        if gated:
            ffn.gate_proj.weight.copy_(w_up[:F])
            ffn.up_proj.weight.copy_(w_up[F:])
        else:
            ffn.up_proj.weight.copy_(w_up)
        ffn.down_proj.weight.copy_(w_down)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    y, y_ref = layer(x), ffn(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    (g,), (g_ref,) = torch.autograd.grad(y.sum(), [x]), torch.autograd.grad(y_ref.sum(), [x])
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)
