"""Equivalence harness: train a tiny MoE model in one process and under expert parallelism on the same
global batch, and record what must agree (docs/parallel.md, "Tests and scripts"; used by the tests and by
``benchmarks/soak_ep.py``). It is a training loop of its own, built from the same parts as the trainer: the
strategy (:class:`~moesaic.distributed.strategy.ExpertDataParallel`: DDP for the dense parameters, expert
gradients over the expert-data-parallel group) and the explicit global aux shares
(:func:`~moesaic.train.exact_aux.global_aux`).

The global batch of ``batch`` sequences is split by sequence over the ranks. The objective is the
one-process one: the mean squared error over the *valid* tokens of the global batch plus the aux losses
(each rank's share of the global batch's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import moesaic
from moesaic.core.config import parse, validate_tree
from moesaic.core.types import RoutingDecision
from moesaic.distributed.collectives import all_reduce_sum
from moesaic.distributed.expert_parallel import apply_expert_parallel_, global_count, is_expert_param
from moesaic.distributed.groups import ParallelGroups
from moesaic.distributed.strategy import ExpertDataParallel
from moesaic.models.regression import RegressionModel, RegressionModelConfig
from moesaic.train.exact_aux import global_aux


@dataclasses.dataclass
class Case:
    dtype: str = "float64"
    steps: int = 50
    d_in: int = 4
    d_model: int = 16
    d_ff: int = 32
    num_experts: int = 4
    top_k: int = 2
    batch: int = 8  # sequences in the global batch
    seq: int = 8
    lr: float = 1e-2
    seed: int = 0
    router: dict[str, Any] = dataclasses.field(default_factory=dict)
    valid_per_rank: list[int] | None = None  # valid tokens of each batch chunk (one chunk per rank)
    zero_router: bool = False  # all scores tie: every token goes to experts 0..k-1
    random_loads: bool = False  # adversarial: router biased by a fresh Dirichlet(0.1) draw every step
    record_grads: bool = True
    backend: str = "loop"  # experts backend (``auto`` picks ``active`` for ranks that receive no rows)


def build_model(case: Case) -> RegressionModel:
    cfg = RegressionModelConfig(d_in=case.d_in, d_model=case.d_model, d_out=1)
    cfg.moe = parse(type(cfg.moe), {
        "d_ff": case.d_ff, "num_experts": case.num_experts, "top_k": case.top_k,
        "router": {"kind": "topk", "aux_loss_coef": 0.01, **case.router},
        "experts": {"kind": "glu", "backend": case.backend}}, "model.moe")
    validate_tree(cfg, "model")
    torch.manual_seed(case.seed)  # after parsing: the first registry lookup imports modules that draw
    model = RegressionModel(cfg).to(getattr(torch, case.dtype))
    if case.zero_router:
        with torch.no_grad():
            model.moe.router.weight.zero_()
    return model


def global_batch(case: Case, step: int, world: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 * case.seed + step)
    dt = getattr(torch, case.dtype)
    x = torch.randn(case.batch, case.seq, case.d_in, generator=g, dtype=torch.float64).to(dt)
    y = (x.sum(-1, keepdim=True).sin() + 0.1 * torch.randn(case.batch, case.seq, 1, generator=g,
                                                            dtype=torch.float64)).to(dt)
    mask = torch.ones(case.batch, case.seq, dtype=torch.bool)
    if case.valid_per_rank:
        per = case.batch // len(case.valid_per_rank)
        for r, n in enumerate(case.valid_per_rank):
            m = torch.zeros(per * case.seq, dtype=torch.bool)
            m[:n] = True
            mask[r * per:(r + 1) * per] = m.view(per, case.seq)
    return x, y, mask


def _adversarial_hook(case: Case, rank: int, step_ref: list[int]) -> Callable[..., RoutingDecision]:
    """Replace the router's choices by draws from Dirichlet(0.1) expert loads, fresh every step (the same
    load vector on every rank, different tokens): many experts get zero tokens, some get almost all."""

    def hook(router: nn.Module, args: tuple[Any, ...], decision: RoutingDecision) -> RoutingDecision:
        step = step_ref[0]
        with torch.random.fork_rng():
            torch.manual_seed(50_000 + step)
            p_E = torch.distributions.Dirichlet(torch.full((case.num_experts,), 0.1)).sample()
        p_E = (p_E + 1e-9) / (p_E + 1e-9).sum()
        g = torch.Generator().manual_seed(90_000 + 1000 * step + rank)
        T, k = decision.num_tokens, case.top_k
        ids_TK = torch.multinomial(p_E.expand(T, -1), k, replacement=False, generator=g) if T else \
            torch.zeros(0, k, dtype=torch.long)
        tok = decision.token_idx_N
        choice = decision.choice_N if decision.choice_N is not None else torch.zeros_like(tok)
        return decision.replace(expert_idx_N=ids_TK[tok, choice].to(decision.expert_idx_N.device))

    return hook


def _random_mask(case: Case, step: int, world: int) -> Tensor:
    g = torch.Generator().manual_seed(70_000 + step)
    per = case.batch // world
    mask = torch.zeros(case.batch, case.seq, dtype=torch.bool)
    for r in range(world):
        n = 0 if torch.rand(1, generator=g).item() < 0.3 else int(torch.randint(0, per * case.seq + 1, (1,),
                                                                                 generator=g))
        m = torch.zeros(per * case.seq, dtype=torch.bool)
        m[:n] = True
        mask[r * per:(r + 1) * per] = m.view(per, case.seq)
    return mask


def run(case: Case, groups: ParallelGroups | None = None) -> dict[str, Any]:
    """Train ``case.steps`` steps; one process when ``groups`` is None. Returns per-step records."""
    groups = groups or ParallelGroups()
    W, r = groups.world_size, groups.rank
    model = build_model(case)
    strategy = ExpertDataParallel(groups)
    forward = strategy.prepare(model) if groups.world_size > 1 else model
    aux_fn = global_aux(groups.dp)
    opt = torch.optim.AdamW(model.parameters(), lr=case.lr)
    kinds = is_expert_param(model)
    out: dict[str, Any] = {"loss": [], "aux": [], "counts": [], "nonfinite": 0}
    per = case.batch // W
    step_ref = [0]
    if case.random_loads:
        model.moe.router.register_forward_hook(_adversarial_hook(case, r, step_ref))
    for step in range(case.steps):
        step_ref[0] = step
        x, y, mask = global_batch(case, step, W)
        if case.random_loads:
            mask = _random_mask(case, step, W)
        x, y, mask = x[r * per:(r + 1) * per], y[r * per:(r + 1) * per], mask[r * per:(r + 1) * per]
        pred = forward(x, mask=mask)
        n_glob = global_count(int(mask.sum()), groups.dp)
        task = (((pred - y) ** 2).squeeze(-1) * mask).sum() / max(n_glob, 1.0)
        aux = aux_fn(model)
        loss = task + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        strategy.finish_backward(model)
        names = strategy.gradient_groups(model)
        if step == 0:
            out["reduced"] = names
            if case.record_grads:
                out["pred0"] = pred.detach().clone()
                out["grads0"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        moesaic.on_optimizer_step(model, step + 1)
        logged = torch.stack([loss.detach(), aux.detach()]).to(torch.float64)
        all_reduce_sum(logged, groups.dp)
        out["loss"].append(float(logged[0]))
        out["aux"].append(float(logged[1]))
        # rows each local expert computed: under expert parallelism, what the exchange delivered
        received = model.moe.experts.received_counts if W > 1 else model.moe.last_stats["tokens_per_expert"]
        out["counts"].append(received.clone())
        out["nonfinite"] += int(not torch.isfinite(logged).all())
    shard = getattr(model.moe.experts, "ep_shard", None)
    out["shard"] = None if shard is None else (shard.offset, shard.num_local)
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["expert_names"] = sorted(n for n, k in kinds.items() if k)
    if hasattr(model.moe.router, "expert_bias"):
        out["expert_bias"] = model.moe.router.expert_bias.clone()
    return out


def ep_worker(rank: int, world: int, jobs: dict[tuple[int, str], Case]) -> dict[tuple[int, str], Any]:
    """Run every job ``(ep_size, name) -> case`` under expert parallelism. A size below the world size
    runs in independent sub-worlds of consecutive ranks (each sub-world reruns the same case in other
    processes). Names starting with ``indivisible`` only apply EP and return the error text (or None)."""
    from moesaic.core.errors import ConfigError
    from moesaic.distributed.groups import build_groups, split_groups

    out: dict[tuple[int, str], Any] = {}
    groups_by_size: dict[int, Any] = {}
    for (size, name), case in jobs.items():
        if size not in groups_by_size:
            groups_by_size[size] = build_groups(world) if size == world else split_groups(size)
        groups = groups_by_size[size]
        if name.startswith("indivisible"):
            model = build_model(case)
            try:
                apply_expert_parallel_(model, groups.ep, batch_group=groups.dp)
                out[size, name] = None
            except ConfigError as e:
                out[size, name] = str(e)
            continue
        if name.startswith("emulated"):  # the all-gather fallback of the exchange (PyTorch #88245)
            from moesaic.distributed import collectives

            collectives.FORCE_EMULATION = True
            try:
                out[size, name] = run(case, groups)
            finally:
                collectives.FORCE_EMULATION = False
            continue
        out[size, name] = run(case, groups)
    return out


#: One MoE layer per dispatch kind (D=8, F=16, E=4) for :func:`layer_worker`.
LAYER_CASES: dict[str, dict[str, Any]] = {
    "sort_auto": {"top_k": 2},
    "capacity": {"top_k": 2, "dispatcher": {"kind": "capacity", "capacity_factor": 0.75}},
    "soft": {"top_k": 1, "router": {"kind": "soft_moe", "slots_per_expert": 2}, "dispatcher": {"kind": "soft"}},
}


def layer_case(name: str, rank: int) -> tuple[moesaic.MoELayer, Tensor, Tensor]:
    """The layer (same weights on every rank), this rank's input ``[2, 6, 8]`` and output gradient."""
    torch.manual_seed(0)
    layer = moesaic.moe_layer(8, 16, 4, **LAYER_CASES[name]).double()
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    return layer, x, torch.randn(2, 6, 8, generator=g, dtype=torch.float64)


def layer_worker(rank: int, world: int) -> dict[str, dict[str, Any]]:
    """Every :data:`LAYER_CASES` layer under expert parallelism over the whole world: output, input
    gradient, this rank's expert-weight gradients and its shard."""
    from moesaic.distributed.groups import build_groups

    groups = build_groups(world)
    out: dict[str, dict[str, Any]] = {}
    for name in LAYER_CASES:
        layer, x, g_y = layer_case(name, rank)
        apply_expert_parallel_(layer, groups.ep, batch_group=groups.dp)
        x.requires_grad_()
        y = layer(x)
        (y * g_y).sum().backward()
        shard = layer.experts.ep_shard
        out[name] = {"y": y.detach(), "gx": x.grad, "shard": (shard.offset, shard.num_local),
                     "grads": {n: getattr(layer.experts, n).grad for n in layer.experts.stacked_names()}}
    return out
