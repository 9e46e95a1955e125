"""Every expert backend's row kernel agrees with ``loop``: outputs and gradients, edge loads."""

import subprocess
import sys

import pytest
import torch

from moesaic.core.types import DispatchPlan
from moesaic.moe.experts.backends import BACKENDS, resolve_backend
from moesaic.moe.experts.grouped_glu import grouped_glu
from moesaic.moe.experts.kernels import StackedFFN, grouped_mm_usable

NAMES = [n for n in BACKENDS.names() if n != "loop"]


def _weights(E, D, F, dtype=torch.float32, gated=True):
    H = 2 * F if gated else F
    w_up = (torch.randn(E, H, D) / D**0.5).to(dtype).requires_grad_()
    w_down = (torch.randn(E, D, F) / F**0.5).to(dtype).requires_grad_()
    return w_up, w_down


def _run(name, x, counts, w_up, w_down, act="silu", gated=True):
    for t in (x, w_up, w_down):
        t.grad = None
    y = BACKENDS.get(name).rows(x, counts, StackedFFN(w_up, w_down, act, gated))
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad.clone(), w_up.grad.clone(), w_down.grad.clone()


LOADS = {
    "random_with_empty": [5, 0, 9, 2],
    "all_on_one": [0, 0, 16, 0],
    "single_row": [0, 1, 0, 0],
    "balanced": [4, 4, 4, 4],
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("load", sorted(LOADS))
@pytest.mark.parametrize("D,F", [(16, 32), (10, 6)])  # (10, 6): rows not 16-byte aligned
def test_backend_matches_loop_fp32(name, load, D, F):
    counts = torch.tensor(LOADS[load])
    x = torch.randn(int(counts.sum()), D, requires_grad=True)
    w_up, w_down = _weights(4, D, F)
    ref = _run("loop", x, counts, w_up, w_down)
    got = _run(name, x, counts, w_up, w_down)
    for r, g in zip(ref, got):
        assert g.shape == r.shape and g.dtype == r.dtype
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("act,gated", [("gelu", False), ("relu", False), ("gelu", True)])
def test_backend_other_activations(name, act, gated):
    counts = torch.tensor([3, 0, 7])
    x = torch.randn(10, 16, requires_grad=True)
    w_up, w_down = _weights(3, 16, 32, gated=gated)
    for r, g in zip(_run("loop", x, counts, w_up, w_down, act, gated), _run(name, x, counts, w_up, w_down, act, gated)):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_backend_bf16_matches_loop(name):
    counts = torch.tensor([6, 0, 20, 6])
    x = torch.randn(32, 16).bfloat16().requires_grad_()
    w_up, w_down = _weights(4, 16, 32, torch.bfloat16)
    ref = _run("loop", x, counts, w_up, w_down)
    got = _run(name, x, counts, w_up, w_down)
    for r, g in zip(ref, got):
        assert g.dtype == torch.bfloat16
        # both round in bf16 (eps 2^-8), in different orders: error relative to the tensor's scale
        scale = r.float().abs().max().clamp_min(1.0)
        assert float((g.float() - r.float()).abs().max()) <= 1e-2 * scale


def test_empty_input_keeps_graph():
    for name in BACKENDS.names():
        x = torch.randn(0, 16, requires_grad=True)
        w_up, w_down = _weights(4, 16, 32)
        y = BACKENDS.get(name).rows(x, torch.zeros(4, dtype=torch.long), StackedFFN(w_up, w_down, "silu", True))
        assert y.shape == (0, 16)
        y.sum().backward()
        assert float(w_up.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("plan", ["one_block+keep", "one_block", "by_expert+keep", "by_expert"])
def test_fused_gather_scatter_gradcheck_fp64(monkeypatch, plan):
    """The fused gather -> FFN -> weighted scatter against float64 finite differences, in every row plan."""
    import moesaic.moe.experts.grouped_glu as gg

    monkeypatch.setattr(gg, "BLOCK_BYTES", 0 if plan.startswith("by_expert") else 1 << 40)
    monkeypatch.setattr(gg, "KEEP_GATHERED_MAX_BYTES", 1 << 40 if plan.endswith("keep") else 0)
    T, D, F, E = 5, 4, 3, 3
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w_up = torch.randn(E, 2 * F, D, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(E, D, F, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([0, 3, 1, 1, 4, 2, 0])  # grouped by expert: counts [2, 0, 5]; token 1 twice
    w = torch.rand(7, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([2, 0, 5])
    f = lambda x, a, b, w: grouped_glu(x, StackedFFN(a, b, "silu", True), counts, rows_N=rows, weight_N=w,
                                       num_out=T)
    assert torch.autograd.gradcheck(f, (x, w_up, w_down, w))


def test_auto_rule():
    assert resolve_backend("auto", 8, 64) == "active"  # decode: N <= E / 2
    assert resolve_backend("auto", 33, 64) == "fused"
    assert resolve_backend("auto", 512, 64) == "fused"
    assert resolve_backend("loop", 8, 64) == "loop"


def test_grouped_mm_probe_is_per_dtype():
    assert isinstance(grouped_mm_usable(torch.device("cpu"), torch.float32), bool)
    assert isinstance(grouped_mm_usable(torch.device("cpu"), torch.bfloat16), bool)


def test_importing_the_backends_runs_no_probe():
    """grouped_mm is probed on first use, per (device, dtype), not when the package is imported."""
    code = ("import moesaic, moesaic.moe.experts.kernels as k; from moesaic.moe.experts.backends import BACKENDS; "
            "BACKENDS.names(); moesaic.moe_layer(8, 16, 4, 2); print(len(k._GMM_OK))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_backends_registry_is_the_project_registry():
    from moesaic.core.registry import Registry

    assert isinstance(BACKENDS, Registry)
    assert {"loop", "grouped_mm", "bmm", "active", "fused"} <= set(BACKENDS.names())


@pytest.mark.parametrize("E,k", [(8, 2), (64, 8), (16, 9)])
def test_active_decode_rows_equal_grouped_mm_bitwise(E, k):
    """Decode (no autograd, <= LOOP_ROWS rows on the CPU): ``active`` loops over the active experts; the same
    matmuls on the same rows as grouped_mm, so equal bit for bit, and within fp32 rounding of float64."""
    from moesaic.moe.experts.backends.active import LOOP_ROWS

    torch.manual_seed(E + k)
    w_up, w_down = (w.detach() for w in _weights(E, 64, 32))
    counts = torch.zeros(E, dtype=torch.long)
    counts[torch.randperm(E)[:k]] = 1
    x = torch.randn(k, 64)
    ffn = StackedFFN(w_up, w_down, "silu", True)
    with torch.no_grad():
        got = BACKENDS.get("active").rows(x, counts, ffn)
        ref64 = BACKENDS.get("loop").rows(x.double(), counts, StackedFFN(w_up.double(), w_down.double(), "silu", True))
        if grouped_mm_usable(x.device, torch.float32) and k <= LOOP_ROWS:
            assert torch.equal(got, BACKENDS.get("grouped_mm").rows(x, counts, ffn))
    torch.testing.assert_close(got.double(), ref64, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("E,k,dup", [(8, 2, False), (64, 8, False), (8, 3, True)])
def test_active_one_token_equals_gather_rows_combine_bitwise(E, k, dup):
    """A batch-1 decode step skips gather and combine (``active.one_token``): bitwise the generic path. A
    token sent twice to one expert takes the generic path (its 2-row matmul may round differently)."""
    from moesaic.moe.experts.backends.active import one_token

    torch.manual_seed(E + k)
    w_up, w_down = (w.detach() for w in _weights(E, 64, 32))
    ffn = StackedFFN(w_up, w_down, "silu", True)
    experts = torch.randperm(E)[:k]
    if dup:
        experts[1] = experts[0]
    order = torch.argsort(experts, stable=True)
    counts = torch.bincount(experts, minlength=E)
    plan = DispatchPlan(torch.zeros(k, dtype=torch.long), torch.rand(k)[order], counts, 1)
    x = torch.randn(1, 64)
    with torch.no_grad():
        got = BACKENDS.get("active").run(x, plan, ffn)
        assert torch.equal(got, plan.combine(BACKENDS.get("active").rows(plan.gather(x), counts, ffn)))
        assert torch.equal(got, plan.combine(BACKENDS.get("loop").rows(plan.gather(x), counts, ffn)))
        if not dup:
            assert torch.equal(got, one_token(x, plan, ffn))
