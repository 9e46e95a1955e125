"""Activation checkpointing (``model.activation_checkpointing``) on the demo model: bitwise the same training,
side effects once per forward, and less memory kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moesaic
from moesaic.core.errors import ConfigError
from moesaic.train.optim import build_adamw
from moesaic.train.run_config import load_run_config

V = 1024


def demo_cfg(ckpt: object, bias: bool = False):
    """The demo's model as ``make demo`` builds it (vocab from its BPE tokenizer: 1024)."""
    sets = [f"model.vocab_size={V}", f"model.activation_checkpointing={str(ckpt).lower()}"]
    if bias:
        sets += ["model.moe.router.expert_bias=true", "model.moe.router.bias_update_rate=0.01"]
    return load_run_config("configs/demo.yaml", sets)


def train(ckpt: object, steps: int = 3, bias: bool = False) -> dict:
    torch.manual_seed(0)
    cfg = demo_cfg(ckpt, bias)
    model = cfg.model.build()
    model.train()
    opt = build_adamw(model, lr=3e-3)
    calls: list[tuple[str, int]] = []
    for layer in moesaic.moe_layers(model):
        layer.register_routing_hook(lambda lay, d, p: calls.append((lay.layer_name, int(p.counts_E.sum()))))
    g = torch.Generator().manual_seed(1)
    losses, stats = [], []
    for step in range(steps):
        ids = torch.randint(V, (2, 65), generator=g)
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
        loss.backward()
        stats.append([{n: [t.detach().clone() for t in s.stats().values()] for n, s in lay.aux_stats.items()}
                      for lay in moesaic.moe_layers(model)])
        stats[-1].append([lay.last_stats["tokens_per_expert"].clone() for lay in moesaic.moe_layers(model)])
        opt.step()
        opt.zero_grad(set_to_none=True)
        moesaic.on_optimizer_step(model, step + 1)
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "calls": calls, "stats": stats,
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def test_losses_state_and_side_effects_equal_with_checkpointing():
    ref, got = train(False, bias=True), train(True, bias=True)
    assert torch.equal(ref["losses"], got["losses"])  # bitwise
    assert got["calls"] == ref["calls"] and len(ref["calls"]) == 3 * 3  # hooks: once per MoE layer and step
    for a, b in zip(ref["stats"], got["stats"]):
        for la, lb in zip(a, b):
            if isinstance(la, dict):
                assert la.keys() == lb.keys() and la
                assert all(torch.equal(x, y) for n in la for x, y in zip(la[n], lb[n]))
            else:
                assert all(torch.equal(x, y) for x, y in zip(la, lb))
    for k, v in ref["state"].items():  # weights and the aux-loss-free expert_bias / step_load buffers
        assert torch.equal(v, got["state"][k]), k
    assert any(k.endswith("expert_bias") and v.abs().sum() > 0 for k, v in ref["state"].items())


def test_the_bias_load_counts_once_per_forward():
    torch.manual_seed(0)
    model = demo_cfg(True, bias=True).model.build()
    model.train()
    ids = torch.randint(V, (2, 33))
    out = model(ids[:, :-1])
    routers = [lay.router for lay in moesaic.moe_layers(model)]
    before = [r.step_load.clone() for r in routers]
    assert all(float(b.sum()) == 2 * 32 * 3 for b in before)  # tokens x top_k(1) x granularity(3)
    (out.logits.sum() + out.aux_loss).backward()  # recomputes every block
    assert all(torch.equal(b, r.step_load) for b, r in zip(before, routers))


def saved_bytes_of_step(ckpt: object) -> int:
    from moesaic.bench.measure import saved_bytes

    torch.manual_seed(0)
    model = demo_cfg(ckpt).model.build()
    model.train()
    ids = torch.randint(V, (16, 129), generator=torch.Generator().manual_seed(0))

    def loss() -> torch.Tensor:
        out = model(ids[:, :-1])
        return F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss

    # torch.utils.checkpoint keeps each checkpointed block's inputs itself (not through saved-tensor hooks):
    # count them too, once per forward of a block
    kept: dict[int, int] = {}

    def count_inputs(layer: torch.nn.Module, args: tuple) -> None:
        from moesaic.moe.recompute import recomputing

        if not recomputing():
            for a in args:
                if isinstance(a, torch.Tensor):
                    kept.setdefault(a.untyped_storage().data_ptr(), a.untyped_storage().nbytes())

    if ckpt:
        for layer in model.model.layers:
            layer.register_forward_pre_hook(count_inputs)
    n, _ = saved_bytes(loss)
    return n + sum(kept.values())


def test_checkpointing_every_block_keeps_under_60_percent_of_the_saved_bytes():
    full, ckpt = saved_bytes_of_step(False), saved_bytes_of_step(True)
    assert ckpt < 0.6 * full, (ckpt, full)


def test_a_list_checkpoints_those_blocks():
    model = demo_cfg([1, 3]).model.build()
    assert model.model.checkpoint_blocks == [False, True, False, True]


def test_block_indices_are_checked():
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        load_run_config("configs/demo.yaml", [f"model.vocab_size={V}", "model.activation_checkpointing=[7]"])
