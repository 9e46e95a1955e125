"""Every registered router's aux losses are splittable (moesaic/moe/routing/aux_stats.py): each loss it emits is a
token mean or declared as additive statistics whose ``fn`` reproduces the loss (fp64, 1e-12); and the
linearised shares of a split batch sum to the whole batch's loss and gradient, also for nonlinear CV^2."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moesaic.core.config import validate_tree
from moesaic.core.registry import DISPATCHERS, ROUTERS
from moesaic.moe.layer import MoEConfig, MoELayer
from moesaic.moe.routing import aux_stats

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
def test_emitted_losses_are_declared_and_reproduced(name):
    layer = _layer(name)
    torch.manual_seed(0)
    x = torch.randn(2, T // 2, D, dtype=torch.float64)
    d = layer.router(x.reshape(-1, D), None, seq_ids_T=torch.arange(2).repeat_interleave(T // 2),
                     **ROUTERS.get(name).example_ctx(T))
    r = layer.router
    for loss in d.aux_losses:
        assert loss in r.token_mean_losses | r.stat_losses, f"{name}: aux loss {loss!r} is not declared"
        if loss in r.stat_losses:
            assert loss in d.aux_stats, f"{name}: no AuxStat for {loss!r}"
            torch.testing.assert_close(d.aux_stats[loss].value(), d.aux_losses[loss], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("make", ["switch", "cv2", "cv2_weighted", "sequence", "combined"])
def test_shares_sum_to_whole_batch_value_and_gradient(make):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(T, E, dtype=torch.float64, generator=g, requires_grad=True)
    seq = torch.repeat_interleave(torch.arange(4), torch.tensor([4, 2, 12, 6]))  # unequal sequences

    def stat(rows):
        p = logits[rows].softmax(-1)
        ids = torch.topk(p.detach(), 2).indices
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        if make == "switch":
            return aux_stats.switch(p, counts)
        if make == "cv2":
            return aux_stats.cv2(p.sum(0))
        if make == "cv2_weighted":
            return aux_stats.cv2(p.sum(0), True, torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64))
        if make == "sequence":
            return aux_stats.sequence(p, ids, seq[rows])
        return aux_stats.combined(a=aux_stats.cv2(p.sum(0)), b=aux_stats.switch(p, counts))

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
    assert abs(float(naive.detach()) - float(full.detach())) > 1e-6
