"""Token-choice top-k: A/B/C weights, ties, DeepSeek-V3 groups, bias, scaling and the sequence-wise loss."""

from __future__ import annotations

import pytest
import torch

import moesaic
from moesaic.moe.routing.base import stable_topk
from moesaic.moe.routing.topk import TopKRouter, TopKRouterConfig

D, E, T = 16, 8, 48


def router(k=2, **cfg):
    r = TopKRouter(TopKRouterConfig(**cfg), D, E, k).double()
    with torch.no_grad():
        r.weight.normal_(0, 0.5)
    return r


def x(n=T):
    return torch.randn(n, D, dtype=torch.float64)


def test_variant_B_equals_variant_C_without_noise():
    b, c = router(3, normalization="renorm"), router(3, normalization="softmax_topk")
    c.load_state_dict(b.state_dict())
    xs = x()
    db, dc = b(xs), c(xs)
    assert torch.equal(db.expert_idx_N, dc.expert_idx_N)
    torch.testing.assert_close(db.weight_N, dc.weight_N, rtol=0, atol=1e-12)
    torch.testing.assert_close(db.dense().sum(-1), torch.ones(T, dtype=torch.float64), rtol=0, atol=1e-12)


def test_variant_A_is_softmax_then_topk():
    r = router(2, normalization="none")
    xs = x()
    d = r(xs)
    p = (xs @ r.weight.t()).softmax(-1)
    ids_ref = p.topk(2, -1).indices
    ids, w = d.to_topk(2)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, p.gather(1, ids_ref), rtol=0, atol=1e-12)


def test_ties_go_to_the_lower_expert_index():
    s = torch.tensor([[0.2, 0.5, 0.5, 0.1, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]])
    _, idx = stable_topk(s, 2)
    assert idx.tolist() == [[1, 2], [0, 1]]
    r = router(2)
    with torch.no_grad():
        r.weight.zero_()  # every score ties: experts 0 and 1 for every token
    ids, _ = r(x(5)).to_topk(2)
    assert ids.tolist() == [[0, 1]] * 5


def test_group_limited_routing_spans_at_most_topk_groups():
    r = router(4, score_func="sigmoid", n_groups=4, topk_groups=2, expert_bias=True)
    with torch.no_grad():
        r.expert_bias.normal_(0, 0.3)
    ids, _ = r(x()).to_topk(4)
    groups = ids // (E // 4)
    assert max(len(set(row)) for row in groups.tolist()) <= 2
    # reference: a per-token loop of the DeepSeek-V3 gate (group score = sum of the top-2 biased scores)
    xs = x(8)
    ids, w = r(xs).to_topk(4)
    s = (xs @ r.weight.t()).sigmoid().detach()
    for t in range(8):
        sel = s[t] + r.expert_bias.double()
        gscore = [sorted(sel[g * 2:(g + 1) * 2].tolist(), reverse=True)[:2] for g in range(4)]
        keep = sorted(range(4), key=lambda g: (-sum(gscore[g]), g))[:2]
        cand = sorted([e for e in range(E) if e // 2 in keep], key=lambda e: (-float(sel[e]), e))[:4]
        assert ids[t].tolist() == cand
        ref = s[t, cand] / s[t, cand].sum()
        torch.testing.assert_close(w[t], ref, rtol=0, atol=1e-12)


def test_bias_is_for_selection_only_and_scaling():
    r = router(2, score_func="sigmoid", expert_bias=True, routed_scaling_factor=2.5)
    xs = x()
    d0 = r(xs)
    with torch.no_grad():
        r.expert_bias += 0.37  # the same constant everywhere changes no selection
    d1 = r(xs)
    assert torch.equal(d0.expert_idx_N, d1.expert_idx_N)
    torch.testing.assert_close(d0.weight_N, d1.weight_N, rtol=0, atol=0)
    with torch.no_grad():
        r.expert_bias.zero_()
        r.expert_bias[5] = 100.0  # a huge bias forces expert 5; its weight still comes from s_5
    ids, w = r(xs).to_topk(2)
    assert (ids == 5).any(-1).all()
    s = (xs @ r.weight.t()).sigmoid()
    ref = s.gather(1, ids)
    torch.testing.assert_close(w, 2.5 * ref / ref.sum(-1, keepdim=True), rtol=0, atol=1e-12)
    torch.testing.assert_close(w.sum(-1), torch.full((T,), 2.5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_bias_update_once_per_optimizer_step_in_the_right_direction():
    r = router(2, score_func="sigmoid", expert_bias=True, bias_update_rate=1e-3).train()
    loads = torch.zeros(E, dtype=torch.float64)
    for _ in range(3):  # three micro-batches, one optimizer step
        d = r(x())
        loads += d.tokens_per_expert().double()
    assert torch.equal(r.expert_bias, torch.zeros(E))  # forwards never touch the bias
    r.on_optimizer_step(1)
    expected = 1e-3 * torch.sign(loads.mean() - loads)
    torch.testing.assert_close(r.expert_bias.double(), expected, rtol=0, atol=1e-9)
    assert int((r.expert_bias > 0).sum()) == int((loads < loads.mean()).sum())
    assert int((r.expert_bias < 0).sum()) == int((loads > loads.mean()).sum())
    before = r.expert_bias.clone()
    r.on_optimizer_step(2)  # no forward since the last step: no load, no change
    assert torch.equal(r.expert_bias, before)
    r.step_load.fill_(5.0)  # perfectly balanced load: the update is a no-op
    r.on_optimizer_step(3)
    assert torch.equal(r.expert_bias, before)
    r.eval()
    r(x())
    assert float(r.step_load.sum()) == 0.0  # eval forwards do not count


def test_bias_is_a_buffer_not_a_parameter():
    r = router(2, score_func="sigmoid", expert_bias=True)
    assert "expert_bias" in dict(r.named_buffers()) and "expert_bias" not in dict(r.named_parameters())


def test_on_optimizer_step_helper_reaches_every_layer():
    layer = moesaic.moe_layer(D, 32, E, 2, router={"kind": "topk", "score_func": "sigmoid", "expert_bias": True})
    layer(torch.randn(T, D))
    moesaic.on_optimizer_step(layer, 1)
    assert float(layer.router.expert_bias.abs().sum()) > 0


def test_sequence_loss_uses_unbiased_topk_and_per_sequence_stats():
    layer = moesaic.moe_layer(D, 32, E, 2, router={"kind": "topk", "score_func": "sigmoid", "expert_bias": True,
                                                   "balance_loss": "sequence", "aux_loss_coef": 1.0}).double()
    xs = torch.randn(3, 10, D, dtype=torch.float64)
    layer(xs)
    from moesaic.moe.routing import losses

    s = (xs.reshape(-1, D) @ layer.router.weight.t()).sigmoid()
    ids = stable_topk(s, 2)[1]
    ref = losses.SequenceBalance(s, ids, torch.arange(3).repeat_interleave(10)).value()
    torch.testing.assert_close(layer.aux_losses["balance"], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", ["renorm", "softmax_topk"])
def test_top1_with_renormalised_weights_warns_and_gets_no_output_gradient(norm):
    with pytest.warns(UserWarning, match="Megatron #894"):
        r = router(1, normalization=norm)
    r(x()).weight_N.sum().backward()
    assert float(r.weight.grad.abs().sum()) == 0.0  # the trap the warning is about


def test_top1_variant_A_gets_a_nonzero_gradient():
    r = router(1, normalization="none")
    r(x()).weight_N.square().sum().backward()
    assert float(r.weight.grad.norm()) > 0


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_sequence_loss_counts_f_over_the_unbiased_topk_of_all_experts_with_groups(bias):
    """DeepSeek-V3 (arXiv 2412.19437) Eq. 18: f_i counts 1(s_i,t in TopK({s_j,t}, K_r)) over ALL routed experts,
    whatever selects them (the group limit, the bias). Hand-derived in float64: 4 experts in 2 groups, 1 group
    kept, K = 2, sigmoid scores s_1 = (0.9, 0.1, 0.8, 0.7), s_2 = (0.2, 0.6, 0.5, 0.3) of one sequence.
    s' = s / sum s: (0.36, 0.04, 0.32, 0.28) and (0.125, 0.375, 0.3125, 0.1875), so P = (0.2425, 0.2075,
    0.31625, 0.23375). Plain top-2: {0, 2} and {1, 2}, f = 4 / (2 * 2) * (1, 1, 2, 0) = (1, 1, 2, 0), so
    L = 0.2425 + 0.2075 + 2 * 0.31625 = 1.0825. Counting the routed (group-limited) choices instead would give
    f = (2, 2, 0, 0) and 0.9 without the bias, (0, 0, 2, 2) and 1.1 with it."""
    s = torch.tensor([[0.9, 0.1, 0.8, 0.7], [0.2, 0.6, 0.5, 0.3]], dtype=torch.float64)
    cfg = TopKRouterConfig(score_func="sigmoid", normalization="renorm", n_groups=2, topk_groups=1,
                           expert_bias=bias, balance_loss="sequence", aux_loss_coef=1.0)
    r = TopKRouter(cfg, 4, 4, 2).double().eval()
    with torch.no_grad():
        r.weight.copy_(torch.eye(4, dtype=torch.float64))  # logits = x, so x = logit(s) gives scores s
        if bias:
            r.expert_bias.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))  # routes both tokens to group 1
    d = r(torch.log(s / (1 - s)))
    routed = {frozenset(d.expert_idx_N[d.token_idx_N == t].tolist()) for t in range(2)}
    assert routed == ({frozenset({2, 3})} if bias else {frozenset({0, 1})})  # the group limit did bind
    assert abs(float(d.aux_losses["balance"].detach()) - 1.0825) < 1e-12
