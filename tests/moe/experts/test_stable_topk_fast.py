"""``stable_topk``'s fast paths (k rounds of max for k <= 4; torch.topk + tie check above) equal the stable sort
exactly: ties, NaN, -inf and signed zeros included."""

import pytest
import torch

from moesaic.moe.routing.base import stable_topk


def _by_sort(s, k):
    v, i = torch.sort(s, dim=-1, descending=True, stable=True)
    return v[..., :k], i[..., :k]


@pytest.mark.parametrize("levels", [3, 1000, None])  # few distinct values: many ties
@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 8])
def test_stable_topk_equals_stable_sort(levels, k):
    g = torch.Generator().manual_seed(k)
    s = torch.rand(200, 8, generator=g)
    if levels:
        s = (s * levels).floor() / levels
    s[0] = 0.5  # all tied: lower index first
    s[1, 3] = float("-inf")
    s[2, :2] = float("nan")
    s[3, 2:] = float("-inf")  # fewer finite values than k: a masked pick must not come back
    s[4] = torch.tensor([0.0, -0.0, 0.0, -0.0, 0.0, -0.0, -0.0, 0.0])  # signed zeros are ties
    v, i = stable_topk(s, k)
    rv, ri = _by_sort(s, k)
    assert torch.equal(i, ri)
    assert torch.equal(v.nan_to_num(-7.0), rv.nan_to_num(-7.0))
    assert i[0].tolist() == list(range(k))


def test_stable_topk_values_carry_the_gradient():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 32, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
    for k in (2, 4, 6):
        v, i = stable_topk(s, k)
        rv, ri = _by_sort(s, k)
        assert torch.equal(i, ri) and torch.equal(v, rv)
        w = torch.arange(1.0, k + 1, dtype=torch.float64)
        (gv,) = torch.autograd.grad((v * w).sum(), s)
        (rg,) = torch.autograd.grad((rv * w).sum(), s)
        assert torch.equal(gv, rg)
