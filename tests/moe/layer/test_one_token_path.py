"""A batch-1 decode step (one token, no autograd, eval, top-k router, sort dispatcher) takes a short path in the
MoE layer; it must be the general path's function bit for bit: output, statistics, aux losses."""

from __future__ import annotations

import pytest
import torch

import moesaic
from moesaic.core.errors import NonFiniteInputError, RoutingInputError

D, F = 16, 24

ROUTERS = {
    "mixtral": {"kind": "topk", "normalization": "renorm", "aux_loss_coef": 0.02, "z_loss_coef": 0.001},
    "deepseek_v3": {"kind": "topk", "score_func": "sigmoid", "n_groups": 4, "topk_groups": 2, "expert_bias": True,
                    "routed_scaling_factor": 2.5, "balance_loss": "sequence", "aux_loss_coef": 0.01},
    "switch_p": {"kind": "topk", "normalization": "none", "device_groups": 2, "device_loss_coef": 0.1},
}


def _pair(router: dict, shared: int) -> tuple[moesaic.MoELayer, moesaic.MoELayer]:
    torch.manual_seed(0)
    fast = moesaic.moe_layer(D, F, 8, 2, router=router, shared_experts={"num": shared})
    slow = moesaic.moe_layer(D, F, 8, 2, router=router, shared_experts={"num": shared})
    slow.load_state_dict(fast.state_dict())
    if router.get("expert_bias"):
        for m in (fast, slow):
            m.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    slow.register_routing_hook(lambda *a: None)  # a hook needs the decision and plan: the general path
    return fast.eval(), slow.eval()


@pytest.mark.parametrize("shape", [(1, 1, D), (1, D), (D,)])
@pytest.mark.parametrize("name,shared", [("mixtral", 0), ("deepseek_v3", 1), ("switch_p", 0)])
def test_one_token_path_equals_the_general_path_bitwise(name, shared, shape):
    fast, slow = _pair(ROUTERS[name], shared)
    general: list[int] = []  # calls of Router.forward (the general path); the short path calls router.choose
    fast.router.forward = lambda *a, **k: general.append(1) or type(fast.router).forward(fast.router, *a, **k)
    for seed in range(5):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            y_fast, y_slow = fast(x, mask=torch.ones(shape[:-1], dtype=torch.bool)), slow(x)
        assert y_fast.shape == x.shape and torch.equal(y_fast, y_slow)
        sf, ss = fast.last_stats, slow.last_stats
        assert set(sf) == set(ss) and sf["assignments"] == ss["assignments"] == 2 and sf["tokens"] == ss["tokens"] == 1
        assert torch.equal(sf["tokens_per_expert"], ss["tokens_per_expert"])
        assert torch.equal(sf["entropy"], ss["entropy"])
        assert fast.aux_losses.keys() == slow.aux_losses.keys() and fast.aux_losses
        for n in fast.aux_losses:
            assert torch.equal(fast.aux_losses[n], slow.aux_losses[n]), n
    assert general == []
    if fast.router.cfg.expert_bias:
        assert float(fast.router.step_load.sum()) == 0  # decoding never counts into the bias load


def test_one_token_path_keeps_the_checks():
    fast, _ = _pair(ROUTERS["mixtral"], 0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(1, D)
        x[0, 3] = bad
        with torch.no_grad(), pytest.raises(NonFiniteInputError, match="moe"):
            fast(x)
    slow = _pair(ROUTERS["mixtral"], 0)[1]
    with torch.no_grad():  # a finite input whose logits overflow: no error, as in the general path
        big = torch.full((1, D), 3e38)
        torch.testing.assert_close(fast(big), slow(big), atol=0, rtol=0, equal_nan=True)
    with torch.no_grad(), pytest.raises(RoutingInputError, match="d_model"):
        fast(torch.randn(D // 2, 2))  # D values, but not one token of width D


def test_padding_token_and_training_take_the_general_path():
    fast, slow = _pair(ROUTERS["mixtral"], 0)
    x = torch.randn(1, 1, D)
    with torch.no_grad():
        assert torch.equal(fast(x, mask=torch.zeros(1, 1, dtype=torch.bool)), torch.zeros(1, 1, D))
        assert fast.last_stats["tokens"] == 0
    y = fast.train()(x)
    assert y.requires_grad and torch.equal(y.detach(), slow(x))
