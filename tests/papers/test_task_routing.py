"""M3ViT task gates, task-pruned inference, domain-enforced routing (Liang et al. 2022; Hallee et al. 2024)."""

import pytest
import torch

import moesaic
from moesaic.core.errors import ConfigError, RoutingInputError
from moesaic.transforms.task_prune import prune_to_task, used_experts


def _layer(E=8, k=2, **router):
    r = {"kind": "task_gates", "num_tasks": 3, "init_std": 0.5, **router}
    return moesaic.moe_layer(16, 32, E, k, router=r).double()


def test_property1_task_selects_gate_experts_shared(ref):
    layer = _layer().eval()
    x = torch.randn(12, 16, dtype=torch.float64)
    for task in range(3):
        y = layer(x, task_id=task)
        p = (x @ layer.router.weight_XED[task].T).softmax(-1)  # that task's gate, variant A
        w, ids = p.topk(2, dim=-1)
        torch.testing.assert_close(y, ref.brute_force(layer, x, torch.zeros_like(p).scatter(1, ids, w)),
                                   atol=1e-12, rtol=0)
    with torch.no_grad():  # swapping two gates swaps the tasks' outputs: only the router depends on task_id
        y0, y1 = layer(x, task_id=0), layer(x, task_id=1)
        layer.router.weight_XED[[0, 1]] = layer.router.weight_XED[[1, 0]].clone()
        torch.testing.assert_close(layer(x, task_id=1), y0, atol=0, rtol=0)
        torch.testing.assert_close(layer(x, task_id=0), y1, atol=0, rtol=0)
    # One task id per sequence ([B]) with [B, S, D] input.
    xb = torch.randn(3, 4, 16, dtype=torch.float64)
    yb = layer(xb, task_id=torch.tensor([2, 0, 1]))
    for b, task in enumerate([2, 0, 1]):
        torch.testing.assert_close(yb[b], layer(xb[b], task_id=task), atol=1e-12, rtol=0)


def test_property2_unselected_experts_get_no_gradient_from_task_loss():
    layer = _layer(E=8, k=1).train()
    x = torch.randn(6, 16, dtype=torch.float64)
    layer(x, task_id=1).square().sum().backward()
    used = layer.last_stats["tokens_per_expert"] > 0
    g = layer.experts.w_up_EHD.grad.abs().sum((1, 2))
    assert (g[~used] == 0).all() and (g[used] > 0).all() and (~used).any()
    assert (layer.router.weight_XED.grad[[0, 2]] == 0).all()  # other tasks' gates untouched


def test_property4_window_golden_and_never_left():
    layer = _layer(E=8, k=2, experts_per_task=3).train()
    assert [layer.router.window(t) for t in range(3)] == [(0, 3), (2, 5), (5, 8)]  # int(t * 5 / 2)
    x = torch.randn(200, 16, dtype=torch.float64)
    for t in range(3):
        e = layer.router(x, task_id=t).expert_idx_N
        lo, hi = layer.router.window(t)
        assert ((e >= lo) & (e < hi)).all()
    with pytest.raises(ConfigError, match="experts_per_task"):
        _layer(E=8, k=2, experts_per_task=1)


def test_task_pruned_inference_equals_full_inference():
    layer = _layer(E=8, k=2, experts_per_task=3).eval()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    for t in range(3):
        pruned = prune_to_task(layer, t)
        assert pruned.experts.num_experts == 3 and pruned.experts.w_up_EHD.shape[0] == 3
        torch.testing.assert_close(pruned(x), layer(x, task_id=t), atol=0, rtol=0)
    # Without a hard partition: keep the experts the task used on calibration data.
    free = _layer(E=8, k=2).eval()
    calib = torch.randn(5, 16, dtype=torch.float64)
    keep = used_experts(free, calib, task_id=2)
    pruned = prune_to_task(free, 2, keep)
    assert pruned.experts.num_experts == len(keep) < 8
    torch.testing.assert_close(pruned(calib), free(calib, task_id=2), atol=0, rtol=0)
    n_params = sum(p.numel() for p in pruned.experts.parameters())
    assert n_params == len(keep) * sum(p[0].numel() for p in free.experts.parameters())
    with pytest.raises(RoutingInputError, match="does not hold"):
        prune_to_task(free, 2, keep[:1])(calib)
    with pytest.raises(RoutingInputError, match="task_id"):
        free(calib)
    with pytest.raises(RoutingInputError, match="task_id"):
        free(calib, task_id=3)


def test_domain_enforced_routing(ref):
    layer = moesaic.moe_layer(16, 32, 3, 1, router={"kind": "domain"}).double()
    assert list(layer.router.parameters()) == []  # output depends on no router parameter
    x = torch.randn(4, 5, 16, dtype=torch.float64)
    dom = torch.tensor([2, 0, 2, 1])
    y = layer(x, domain_id=dom)
    assert torch.equal(layer.last_stats["tokens_per_expert"], torch.tensor([5, 5, 10]))
    for b in range(4):
        torch.testing.assert_close(y[b], ref.expert_out(layer, int(dom[b]), x[b]), atol=1e-12, rtol=0)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 2:] = False
    y_m = layer(x, mask=mask, domain_id=dom)
    assert (y_m[1, 2:] == 0).all()
    torch.testing.assert_close(y_m[mask], y[mask], atol=1e-12, rtol=0)
    with pytest.raises(RoutingInputError, match="domain_id"):
        layer(x, domain_id=torch.tensor([0, 1, 3, 0]))


def test_cv2_balance_reading():
    """Both balance readings: Switch (1 at uniform) and the code's CV^2 importance + load (0 when balanced)."""
    layer = _layer(E=4, k=1, balance_loss="cv2", noise_std=0.0).train()
    torch.nn.init.zeros_(layer.router.weight_XED)
    x = torch.randn(8, 16, dtype=torch.float64)
    layer(x, task_id=0)  # uniform gate, ties -> expert 0 for every token: maximal imbalance
    imp = torch.tensor([8 * 0.25, 0, 0, 0], dtype=torch.float64)
    load = torch.tensor([8.0, 0, 0, 0], dtype=torch.float64)
    want = imp.var(unbiased=False) / imp.mean() ** 2 + load.var(unbiased=False) / load.mean() ** 2
    torch.testing.assert_close(layer.aux_losses["balance"] / 0.01, want)
    sw = _layer(E=4, k=1, noise_std=0.0).train()
    torch.nn.init.zeros_(sw.router.weight_XED)
    sw(x, task_id=0)
    torch.testing.assert_close(sw.aux_losses["balance"] / 0.01, torch.tensor(1.0, dtype=torch.float64))


def test_concat_conditioning_option_b(ref):
    """M3ViT option (b): one gate on [x ; phi(onehot(task))]; task-pruned inference still equals full."""
    layer = _layer(E=8, k=2, conditioning="concat", task_dim=5).eval()
    r = layer.router
    assert not hasattr(r, "weight_XED") and r.weight_EG.shape == (8, 16 + 5)
    x = torch.randn(10, 16, dtype=torch.float64)
    outs = []
    for task in range(3):
        feat = r.task_mlp(torch.nn.functional.one_hot(torch.tensor(task), 3).double())
        p = (torch.cat([x, feat.expand(10, 5)], 1) @ r.weight_EG.T).softmax(-1)
        w, ids = p.topk(2, dim=-1)
        y = layer(x, task_id=task)
        torch.testing.assert_close(y, ref.brute_force(layer, x, torch.zeros_like(p).scatter(1, ids, w)),
                                   atol=1e-12, rtol=0)
        outs.append(y)
        pruned = prune_to_task(layer, task, used_experts(layer, x, task))
        torch.testing.assert_close(pruned(x), y, atol=0, rtol=0)
    assert not torch.equal(outs[0], outs[1])
