"""Aux losses as statistics (moesaic/moe/routing/aux_stats.py): for every registered router each aux loss is a
statistic whose value is the loss and whose statistics ADD over disjoint parts of a batch (checked by running
the router on the parts); the linearised shares of a split batch sum to the whole batch's loss and gradient
(fp64, 1e-12), also for the nonlinear CV^2 and for token means."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moesaic.core.config import validate_tree
from moesaic.moe.dispatch.base import DISPATCHERS
from moesaic.moe.layer import MoEConfig, MoELayer
from moesaic.moe.routing import aux_stats, losses
from moesaic.moe.routing.base import ROUTERS
from moesaic.moe.routing.dts import GateUsageBalance

D, F, E, T = 16, 32, 4, 24


def _layer(name: str) -> MoELayer:
    cls = ROUTERS.get(name)
    base = cls.Config()
    coefs = {f.name: 0.05 for f in dataclasses.fields(base) if f.name.endswith("_coef")}
    rcfg = dataclasses.replace(base, **coefs)
    extra = {"dispatcher": DISPATCHERS.get(cls.requires_dispatcher).Config()} if cls.requires_dispatcher else {}
    for k in [cls.required_top_k] if cls.required_top_k else [2, 1]:
        try:
            cfg = validate_tree(MoEConfig(d_ff=F, num_experts=E, top_k=k, router=rcfg, **extra), "moe")
            break
        except Exception:  # noqa: BLE001 - k=1-only routers that do not say so
            continue
    layer = MoELayer(cfg, D).to(torch.float64)
    with torch.no_grad():
        for p in layer.router.parameters():
            p.normal_(0.0, 0.5)
    return layer


@pytest.mark.parametrize("name", ROUTERS.names())
def test_every_router_loss_is_a_statistic_that_adds_over_parts(name):
    """Eval mode (token-wise deterministic routing): the statistics of the batch equal the sums of those of
    two parts (whole sequences), ``fn`` of the summed statistics is the batch's loss, and the losses the
    decision reports are exactly the statistics' values."""
    layer = _layer(name).eval()
    r = layer.router
    torch.manual_seed(0)
    x = torch.randn(T, D, dtype=torch.float64)
    seq = torch.arange(4).repeat_interleave(T // 4)
    ctx = ROUTERS.get(name).example_ctx(T)

    def route(rows: torch.Tensor):
        sub = {k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == T else v)
               for k, v in ctx.items()}
        torch.manual_seed(1)
        return r(x[rows], None, seq_ids_T=seq[rows], **sub)

    whole = route(torch.arange(T))
    assert whole.aux_losses.keys() == whole.aux_stats.keys()
    for n, st in whole.aux_stats.items():
        assert whole.aux_losses is whole.aux_losses  # computed once per decision
        torch.testing.assert_close(whole.aux_losses[n], st.fn(st.stats()), atol=0, rtol=0)
    parts = [route(torch.arange(0, 12)), route(torch.arange(12, T))]
    for n, st in whole.aux_stats.items():
        s_whole, s_parts = st.stats(), [p.aux_stats[n].stats() for p in parts]
        assert s_whole.keys() == s_parts[0].keys() == s_parts[1].keys()
        for k in s_whole:
            torch.testing.assert_close(s_parts[0][k] + s_parts[1][k], s_whole[k], atol=1e-12, rtol=0,
                                       msg=f"{name}: statistic {n}.{k} does not add")
        summed = {k: s_parts[0][k] + s_parts[1][k] for k in s_whole}
        torch.testing.assert_close(st.fn(summed), whole.aux_losses[n], atol=1e-12, rtol=0)


@pytest.mark.parametrize("make", ["switch", "cv2", "cv2_weighted", "sequence", "combined", "token_mean",
                                  "gate_usage"])
def test_shares_sum_to_whole_batch_value_and_gradient(make):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(T, E, dtype=torch.float64, generator=g, requires_grad=True)
    seq = torch.repeat_interleave(torch.arange(4), torch.tensor([4, 2, 12, 6]))  # unequal sequences

    def stat(rows):
        p = logits[rows].softmax(-1)
        ids = torch.topk(p.detach(), 2).indices
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        if make == "switch":
            return losses.SwitchBalance(p, counts)
        if make == "cv2":
            return losses.CV2(p.sum(0))
        if make == "cv2_weighted":
            return losses.CV2(p.sum(0), True, torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64))
        if make == "sequence":
            return losses.SequenceBalance(p, ids, seq[rows])
        if make == "token_mean":
            return losses.z_loss(logits[rows])
        if make == "gate_usage":
            return GateUsageBalance(p, p.detach() > 0.2)
        return aux_stats.Sum(a=losses.CV2(p.sum(0)), b=losses.SwitchBalance(p, counts))

    full = stat(torch.arange(T)).value()
    (g_full,) = torch.autograd.grad(full, logits)
    parts = [torch.arange(0, 6), torch.arange(6, 18), torch.arange(18, 24)]  # whole sequences, unequal sizes
    local = [stat(rows) for rows in parts]
    stats = [st.stats() for st in local]
    total = {k: sum(s[k].detach() for s in stats) for k in stats[0]}
    shares = [aux_stats.share(st, s, total, len(rows) / T) for st, s, rows in zip(local, stats, parts)]
    total_share = sum(shares)
    (g_split,) = torch.autograd.grad(total_share, logits)
    assert abs(float(total_share.detach()) - float(full.detach())) <= 1e-12
    torch.testing.assert_close(g_split, g_full, atol=1e-12, rtol=0)
    naive = sum(st.value() * len(rows) / T for st, rows in zip(local, parts))  # what micro_batch mode gives
    if make == "token_mean":  # a token mean is the one loss whose token-weighted part values are exact
        assert abs(float(naive.detach()) - float(full.detach())) <= 1e-12
    else:
        assert abs(float(naive.detach()) - float(full.detach())) > 1e-6


def test_token_mean_share_needs_no_totals():
    """The z-loss share of a part is its value times the part's token fraction, whatever the other parts hold:
    why a z-only router needs no batch totals (Router.needs_batch_totals)."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(10, E, dtype=torch.float64, generator=g, requires_grad=True)
    st = losses.z_loss(z[:4])
    for other in (z[4:], 3.0 * z[4:]):
        total = {k: st.stats()[k] + losses.z_loss(other).stats()[k] for k in st.stats()}
        torch.testing.assert_close(st.share(st.stats(), total, 0.4), 0.4 * st.value(), atol=1e-14, rtol=0)
    cfg = ROUTERS.get("topk").Config(aux_loss_coef=0.0, z_loss_coef=0.01)
    assert not cfg.build(D, E, 2).needs_batch_totals()
    assert ROUTERS.get("topk").Config(aux_loss_coef=0.01).build(D, E, 2).needs_batch_totals()
