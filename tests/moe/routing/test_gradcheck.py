"""``torch.autograd.gradcheck`` of router + dispatch + experts + combine, float64, tiny shapes.

Top-k is piecewise constant, so each case first checks that the input sits at least ``MARGIN`` away from
any tie in the selection (gradcheck perturbs by 1e-6); inside that region the layer is smooth.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import moesaic

D, F, E, T, MARGIN = 4, 4, 3, 5, 1e-3

CASES = {
    "topk_A": ({"kind": "topk", "normalization": "none"}, 2),
    "topk_B": ({"kind": "topk", "normalization": "renorm"}, 2),
    "topk_C": ({"kind": "topk", "normalization": "softmax_topk"}, 2),
    "topk_sigmoid_v3": ({"kind": "topk", "score_func": "sigmoid", "routed_scaling_factor": 2.5}, 2),
    "switch": ({"kind": "switch"}, 1),
    "gshard": ({"kind": "gshard"}, 2),
    "noisy_topk": ({"kind": "noisy_topk"}, 2),
    "expert_choice": ({"kind": "expert_choice", "capacity_factor": 1.2}, 2),
}


def selection_margin(scores_TE: torch.Tensor, k: int, over_tokens: bool) -> float:
    s = scores_TE.t() if over_tokens else scores_TE
    srt = s.sort(-1, descending=True).values
    return float((srt[:, k - 1] - srt[:, k]).min())


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradcheck_router_and_combine(case):
    router, k = CASES[case]
    layer = moesaic.moe_layer(D, F, E, k, router=router, experts={"backend": "loop"}).double().eval()
    over_tokens = router["kind"] == "expert_choice"
    for seed in range(50):  # a deterministic search for an input far from ties
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(T, D, dtype=torch.float64, generator=g)
        with torch.no_grad():
            for p in layer.router.parameters():
                p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=g))
            z = layer.router.logits(x)
            scores = z.sigmoid() if router.get("score_func") == "sigmoid" else z.softmax(-1)
            kk = max(1, round(T * 1.2 / E)) if over_tokens else k
            if selection_margin(scores, kk, over_tokens) > MARGIN:
                break
    else:
        raise AssertionError("no tie-free input found")
    # inputs: the tokens and the router's parameters (the experts' gradients are checked against the dense
    # FFN in tests/layers); the experts stay fixed
    names = [f"router.{n}" for n, _ in layer.router.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.router.named_parameters()]

    def f(x_, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x_,), strict=False)

    x = x.requires_grad_()
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)
    # the router weight really is on the path (a non-zero gradient from the output)
    (gw,) = torch.autograd.grad(f(x, *params).square().sum(), params[names.index("router.weight")])
    assert float(gw.abs().max()) > 0
