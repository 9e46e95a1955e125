"""``stable_topk``'s fast path (torch.topk + tie check) equals the stable sort exactly, ties included."""

import pytest
import torch

from moesaic.routing.base import stable_topk


def _by_sort(s, k):
    v, i = torch.sort(s, dim=-1, descending=True, stable=True)
    return v[..., :k], i[..., :k]


@pytest.mark.parametrize("levels", [3, 1000, None])  # few distinct values: many ties
@pytest.mark.parametrize("k", [1, 2, 7, 8])
def test_stable_topk_equals_stable_sort(levels, k):
    g = torch.Generator().manual_seed(k)
    s = torch.rand(200, 8, generator=g)
    if levels:
        s = (s * levels).floor() / levels
    s[0] = 0.5  # all tied: lower index first
    s[1, 3] = float("-inf")
    s[2, :2] = float("nan")
    v, i = stable_topk(s, k)
    rv, ri = _by_sort(s, k)
    assert torch.equal(i, ri)
    assert torch.equal(v.nan_to_num(-7.0), rv.nan_to_num(-7.0))
    assert i[0].tolist() == list(range(k))
