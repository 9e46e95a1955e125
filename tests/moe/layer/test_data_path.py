"""The layer's one data path: input checks, token-shaped context, aux statistics, the routing hook and the
experts interface as a wrapper implements it."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import moesaic
from moesaic.analysis.recorder import RoutingRecorder
from moesaic.core.errors import RoutingInputError
from moesaic.core.types import DispatchPlan, RoutingDecision
from moesaic.moe.experts.stacked_ffn import FFNExperts

D, F, E = 8, 16, 4


def test_input_width_is_checked_and_named():
    """Defect: with d_model=6 an input (6, 5) was re-sliced into 5 tokens of width 6."""
    layer = moesaic.moe_layer(6, F, E, 2)
    layer.layer_name = "blocks.3.moe"
    with pytest.raises(RoutingInputError) as err:
        layer(torch.randn(6, 5))
    msg = str(err.value)
    assert "blocks.3.moe" in msg and "(6, 5)" in msg and "d_model = 6" in msg
    with pytest.raises(RoutingInputError, match="d_model = 6"):
        layer(torch.randn(2, 3, 5))
    assert layer(torch.randn(5, 6)).shape == (5, 6)


def test_token_shaped_context_is_flattened_and_the_rest_passed_as_is():
    seen: dict[str, object] = {}
    # a router that reads sequence ids (DeepSeek-V3's sequence-wise balance loss) gets them built
    layer = moesaic.moe_layer(D, F, E, 2, router={"kind": "topk", "balance_loss": "sequence"})
    original = layer.router.route

    def spy(x_TD: Tensor, **ctx: object) -> RoutingDecision:
        seen.update(ctx)
        return original(x_TD)

    layer.router.route = spy  # type: ignore[method-assign]
    ids_BS, per_seq_B, scores_BSE = torch.arange(6).view(2, 3), torch.tensor([4, 5]), torch.randn(2, 3, E)
    layer(torch.randn(2, 3, D), token_ids=ids_BS, domain=per_seq_B, extra_BSE=scores_BSE, note="x")
    assert torch.equal(seen["token_ids"], ids_BS.reshape(6))
    assert torch.equal(seen["extra_BSE"], scores_BSE.reshape(6, E))
    assert seen["domain"] is per_seq_B and seen["note"] == "x"
    assert torch.equal(seen["seq_ids_T"], torch.tensor([0, 0, 0, 1, 1, 1]))

def test_sequence_ids_are_built_only_for_routers_that_read_them():
    """Building ``seq_ids_T`` costs two ops per call; a router that never reads it does not get it."""
    seen: dict[str, object] = {}
    layer = moesaic.moe_layer(D, F, E, 2)
    assert not layer.router.uses_seq_ids()
    original = layer.router.route

    def spy(x_TD: Tensor, **ctx: object) -> RoutingDecision:
        seen.update(ctx)
        return original(x_TD)

    layer.router.route = spy  # type: ignore[method-assign]
    layer(torch.randn(2, 3, D))
    assert "seq_ids_T" not in seen


def test_aux_losses_weighted_and_aux_stats_are_the_decisions():
    layer = moesaic.moe_layer(D, F, E, 2, router={"aux_loss_coef": 0.5})
    seen: list[RoutingDecision] = []
    layer.register_routing_hook(lambda m, d, p: seen.append(d))
    layer(torch.randn(10, D))
    assert layer.aux_stats == dict(seen[0].aux_stats) and "balance" in layer.aux_stats
    assert torch.equal(layer.aux_losses["balance"], 0.5 * seen[0].aux_losses["balance"])


def test_routing_hook_sees_every_forward_and_is_removable():
    layer = moesaic.moe_layer(D, F, E, 2, dispatcher={"kind": "capacity", "capacity_factor": 0.5})
    calls: list[tuple[object, RoutingDecision, DispatchPlan]] = []
    handle = layer.register_routing_hook(lambda m, d, p: calls.append((m, d, p)))
    layer(torch.randn(12, D))
    m, d, p = calls[0]
    assert m is layer and d.num_tokens == 12 and int(p.counts_E.sum()) + p.dropped == d.num_assignments
    assert p.dropped > 0 and torch.equal(p.counts_E, layer.last_stats["tokens_per_expert"])
    layer(torch.randn(2, 3, D))
    assert len(calls) == 2 and calls[1][1].num_tokens == 6
    handle.remove()
    layer(torch.randn(4, D))
    assert len(calls) == 2


def test_recorder_uses_the_hook_and_patches_nothing():
    model = nn.Sequential(moesaic.moe_layer(D, F, E, 2), moesaic.moe_layer(D, F, E, 2))
    router_hooks = [len(m.router._forward_hooks) for m in model]
    with RoutingRecorder(model) as rec:
        model(torch.randn(5, D))
        assert [len(m.router._forward_hooks) for m in model] == router_hooks
    ids = rec.topk_ids()
    assert list(ids) == ["0", "1"] and ids["0"].shape == (5, 2)
    assert all(not m._routing_hooks for m in model)
    model(torch.randn(5, D))
    assert rec.topk_ids()["0"].shape == (5, 2)  # nothing recorded after exit


class PerExpertStorage(nn.Module):
    """A wrapper that keeps every expert's tensors as separate parameters (as an offloading store keeps one
    file per expert) and implements the experts interface by running the wrapped kernel on them."""

    def __init__(self, inner: FFNExperts):
        super().__init__()
        object.__setattr__(self, "inner", inner)  # the kernel only; its own tensors are not used
        self.num_experts = inner.num_experts
        self._names = inner.stacked_names()
        self.store = nn.ModuleList()
        for e in range(inner.num_experts):
            one = nn.Module()
            for n, t in inner.expert_state(e).items():
                one.register_parameter(n, nn.Parameter(t.detach().clone()))
            self.store.append(one)

    def forward(self, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        stacked = {n: torch.stack([getattr(one, n) for one in self.store]) for n in self._names}
        y_TD: Tensor = torch.func.functional_call(self.inner, stacked, (x_TD, plan))
        return y_TD

    def stacked_names(self) -> list[str]:
        return list(self._names)

    def expert_state(self, e: int) -> dict[str, Tensor]:
        return {n: getattr(self.store[e], n) for n in self._names}

    def load_expert_state(self, e: int, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, t in state.items():
                getattr(self.store[e], n).copy_(t)


@pytest.mark.parametrize("dispatcher", ["sort", "capacity"])
def test_a_wrapper_implementing_the_experts_interface_gives_identical_outputs_and_gradients(dispatcher):
    torch.manual_seed(0)
    ref = moesaic.moe_layer(D, F, E, 2, dispatcher={"kind": dispatcher}).double()
    wrapped = moesaic.moe_layer(D, F, E, 2, dispatcher={"kind": dispatcher}).double()
    wrapped.load_state_dict(ref.state_dict())
    wrapped.experts = PerExpertStorage(wrapped.experts)
    for e in range(E):
        for n, t in ref.experts.expert_state(e).items():
            assert torch.equal(wrapped.experts.expert_state(e)[n], t)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), wrapped(xb)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    for n in ref.experts.stacked_names():
        full = getattr(ref.experts, n).grad
        for e in range(E):
            assert torch.equal(getattr(wrapped.experts.store[e], n).grad, full[e]), (n, e)
    assert torch.equal(ref.router.weight.grad, wrapped.router.weight.grad)
    new = {n: t + 1 for n, t in wrapped.experts.expert_state(1).items()}
    wrapped.experts.load_expert_state(1, new)
    assert all(torch.equal(wrapped.experts.expert_state(1)[n], t) for n, t in new.items())


def test_expert_parallel_of_one_process_keeps_names_and_outputs():
    """apply_expert_parallel_ without a group wraps the experts; names, state dict and outputs are unchanged."""
    from moesaic.distributed.ep_experts import ExpertParallelExperts
    from moesaic.distributed.expert_parallel import apply_expert_parallel_

    torch.manual_seed(0)
    model = nn.Sequential(moesaic.moe_layer(D, F, E, 2)).double()
    ref = nn.Sequential(moesaic.moe_layer(D, F, E, 2)).double()
    ref.load_state_dict(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    apply_expert_parallel_(model, None)
    assert isinstance(model[0].experts, ExpertParallelExperts)
    assert [n for n, _ in model.named_parameters()] == names
    assert list(model.state_dict()) == list(ref.state_dict())
    x = torch.randn(7, D, dtype=torch.float64)
    assert torch.equal(model(x), ref(x))
    assert model[0].experts.cfg is model[0].experts.local.cfg  # other attributes read through
