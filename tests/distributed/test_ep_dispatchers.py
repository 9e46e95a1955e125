"""Expert parallelism is one wrapper for every dispatcher: sort (auto backend), capacity (drops per rank,
before the exchange) and Soft MoE slots, on 2 gloo processes, equal the one-process layer run on each
rank's tokens (float64): outputs, input gradients and the expert gradients summed over ranks."""

import pytest
import torch

from moesaic.distributed.launch import spawn
from moesaic.train.ep_equivalence import LAYER_CASES, layer_case, layer_worker

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(240)]
W = 2


@pytest.fixture(scope="module")
def spawned():
    return spawn(layer_worker, W)


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_ep_wrapper_equals_one_process(spawned, name):
    grads: dict[str, torch.Tensor] = {}
    for r in range(W):
        layer, x, g_y = layer_case(name, r)
        x.requires_grad_()
        y = layer(x)
        (y * g_y).sum().backward()
        got = spawned[r][name]
        torch.testing.assert_close(got["y"], y.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(got["gx"], x.grad, rtol=0, atol=1e-12)
        for n in layer.experts.stacked_names():
            g = getattr(layer.experts, n).grad
            grads[n] = g if n not in grads else grads[n] + g
    for r in range(W):
        off, L = spawned[r][name]["shard"]
        assert L == 2
        for n, g in spawned[r][name]["grads"].items():
            torch.testing.assert_close(g, grads[n][off:off + L], rtol=0, atol=1e-12, msg=n)
