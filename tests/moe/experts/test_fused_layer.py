"""The layer's fused path (sort dispatch + ``fused`` experts) equals the reference path exactly in routing
and within fp tolerance in outputs and every gradient; autocast keeps the router in fp32."""

import pytest
import torch

import moesaic


def _layer(backend, E=4, k=2, D=16, F=32, **kw):
    torch.manual_seed(0)
    return moesaic.moe_layer(D, F, E, k, experts={"kind": "glu", "backend": backend}, **kw)


def _fwd_bwd(layer, x, mask=None):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = layer(x, mask=mask)
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
    (loss + moesaic.collect_aux_losses(layer)).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("backend", ["auto", "fused", "grouped_mm", "bmm", "active"])
@pytest.mark.parametrize("T,E,k", [(1, 4, 2), (24, 4, 2), (7, 8, 1)])
def test_layer_backends_match_loop(backend, T, E, k):
    ref_layer, layer = _layer("loop", E=E, k=k), _layer(backend, E=E, k=k)
    layer.load_state_dict(ref_layer.state_dict())
    x = torch.randn(T, 16)
    y0, gx0, g0 = _fwd_bwd(ref_layer, x)
    y1, gx1, g1 = _fwd_bwd(layer, x)
    assert torch.equal(ref_layer.last_stats["tokens_per_expert"], layer.last_stats["tokens_per_expert"])
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx1, gx0, atol=1e-5, rtol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-5, msg=n)


def test_fused_path_with_padding_mask_and_shared_expert():
    kw = {"shared_experts": {"num": 1, "gate": "sigmoid"}}
    ref_layer, layer = _layer("loop", **kw), _layer("auto", **kw)
    layer.load_state_dict(ref_layer.state_dict())
    x = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    y0, gx0, g0 = _fwd_bwd(ref_layer, x, mask)
    y1, gx1, g1 = _fwd_bwd(layer, x, mask)
    assert float(y1[1, 4:].abs().max()) == 0.0
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx1, gx0, atol=1e-5, rtol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-5, msg=n)
    assert torch.isfinite(layer.last_stats["entropy"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["loop", "auto", "grouped_mm", "bmm"])
def test_autocast_router_fp32_experts_low_precision(dtype, backend):
    layer = _layer(backend, E=4, k=2, D=16, F=32)
    ref = _layer("loop", E=4, k=2, D=16, F=32)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(32, 16)
    seen = {}
    layer.router.register_forward_hook(lambda m, i, out: seen.update(logits=out.logits_TE, w=out.weight_N))
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert seen["logits"].dtype == torch.float32 and seen["w"].dtype == torch.float32
    assert y.dtype == dtype
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in layer.parameters())
    with torch.no_grad():
        y_ref = ref(x)
    scale = float(y_ref.abs().max())
    assert float((y.detach().float() - y_ref).abs().max()) <= 2e-2 * max(scale, 1.0)


def test_subclass_overriding_forward_is_what_the_layer_runs():
    """The layer calls ``experts(x_TD, plan)`` and nothing else: a subclass's forward is the whole story."""
    from moesaic.moe.experts.stacked_ffn import GLUExperts

    class Scaled(GLUExperts):
        def forward(self, x_TD, plan, backend=None):
            return 2 * super().forward(x_TD, plan, backend)

    layer = _layer("auto")
    x = torch.randn(64, 16)
    y = layer(x)
    layer.experts.__class__ = Scaled
    torch.testing.assert_close(layer(x), 2 * y)


@pytest.mark.parametrize("keep", [True, False])  # keep activations for backward / recompute them
@pytest.mark.parametrize("block_bytes", [0, 600, 1 << 40])  # one expert per block, a few, all in one
@pytest.mark.parametrize("D,F", [(16, 8), (8, 32)])  # recomputing: F < D scales the activation, F > D the gradient
def test_fused_row_plans_match_loop_fp64(monkeypatch, keep, block_bytes, D, F):
    """Every CPU plan of the fused function (experts in blocks of a given size of row temporaries; with or
    without the activations kept for backward) equals the loop reference in float64, including an expert
    without rows."""
    import moesaic.moe.experts.grouped_glu as gg

    monkeypatch.setattr(gg, "BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(gg, "KEEP_GATHERED_MAX_BYTES", 1 << 40 if keep else 0)
    ref_layer, layer = _layer("loop", E=6, k=2, D=D, F=F), _layer("auto", E=6, k=2, D=D, F=F)
    layer.load_state_dict(ref_layer.state_dict())
    ref_layer.double(), layer.double()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    y0, gx0, g0 = _fwd_bwd(ref_layer, x)
    y1, gx1, g1 = _fwd_bwd(layer, x)
    torch.testing.assert_close(y1, y0, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gx1, gx0, atol=1e-12, rtol=1e-12)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-12, rtol=1e-12, msg=n)


def test_fused_keeps_activations_only_while_all_of_them_are_small():
    """The keep-for-backward rule counts every kept activation ([N, D + H + 3F]), not just the gathered rows:
    narrow inputs with wide experts recompute instead of holding N x 5F floats."""
    import moesaic.moe.experts.grouped_glu as gg

    x = torch.zeros(1, 16)
    w_up, w_down = torch.zeros(1, 2048, 16), torch.zeros(1, 16, 1024)
    row_bytes = (16 + 2048 + 3 * 1024) * 4
    n_big = gg.KEEP_GATHERED_MAX_BYTES // row_bytes + 1
    assert n_big * 16 * 4 < gg.KEEP_GATHERED_MAX_BYTES  # the gathered rows alone would be kept
    assert not gg._keep_for_backward(n_big, x, w_up, w_down)  # all kept activations exceed the limit
    assert gg._keep_for_backward(n_big // 4, x, w_up, w_down)
