"""Train a paper technique's recipe and a plain top-k baseline on the toy regression task; print both.

Usage: ``python -m moesaic.examples.paper_toys configs/papers/top_p.yaml [--set k=v ...]``

The model must be ``moe_regression``. Both runs use the same sizes, steps, seed and data; the baseline
swaps the router for softmax top-2 (renormalised, Switch balance 0.01) and the sort dispatcher.
Routers that need context get the input's cluster (nearest cluster centre of the toy data) as
``token_ids`` (hash), ``task_id`` (M3ViT gates) or ``domain_id`` (domain routing). Inputs are fed as
sequences of 16 samples (``[n / 16, 16, d_in]``), the group a Soft MoE slot mixes. With ``d_out > 1``
the task becomes classification: the target is cut into ``d_out`` equally likely bins and the loss is
cross-entropy; THOR routers then train with :func:`moesaic.train.objectives.thor.thor_step` (two passes plus
``alpha`` times the consistency loss, divided by the batch size to match the mean cross-entropy).
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import torch
from torch import Tensor, nn

import moesaic
from moesaic.core.errors import MoesaicError
from moesaic.models.regression import RegressionModelConfig
from moesaic.moe.dispatch.base import DISPATCHERS
from moesaic.moe.routing.base import ROUTERS, RouterConfig
from moesaic.train.run_config import load_run_config

GROUP = 16  # tokens per sequence: inputs are reshaped to [n / 16, 16, d_in] (Soft MoE mixes within one)


def _ctx(router_kind: str, data: Any, x: Tensor) -> dict[str, Tensor]:
    keys = ROUTERS.get(router_kind).example_ctx(1).keys()
    if not keys:
        return {}
    cluster = torch.cdist(x, data.centres).argmin(-1)
    return {k: cluster for k in keys}


def train_eval(cfg: Any, alpha: float, label: str) -> dict[str, float]:
    torch.manual_seed(cfg.train.seed)
    model, data = cfg.model.build(), cfg.data.build()
    kind = cfg.model.moe.router.kind
    n_cls = cfg.model.d_out
    big_y = data.batch(65536, torch.Generator().manual_seed(99))[1].squeeze(-1)
    edges = torch.quantile(big_y, torch.linspace(0, 1, n_cls + 1)[1:-1]) if n_cls > 1 else None
    if kind == "hash" and model.moe.router.cfg.variant == "balanced":
        xs = data.batch(4096, torch.Generator().manual_seed(98))[0]
        model.moe.router.fit_balanced(_ctx(kind, data, xs)["token_ids"])

    def loss_fn(m: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, None]:
        x, y = batch
        out = m(x.view(-1, GROUP, x.shape[-1]), **_ctx(kind, data, x)).reshape(x.shape[0], -1)
        if edges is None:
            return nn.functional.mse_loss(out, y), out, None
        return nn.functional.cross_entropy(out, torch.bucketize(y.squeeze(-1), edges)), out, None

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                            weight_decay=cfg.train.weight_decay)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    for step in range(1, cfg.train.max_steps + 1):
        batch = data.batch(cfg.train.batch_size, gen)
        if kind == "thor" and edges is not None:
            from moesaic.train.objectives.thor import thor_step

            loss = thor_step(model, batch, loss_fn, alpha / cfg.train.batch_size).loss
        else:
            loss = loss_fn(model, batch)[0] + moesaic.collect_aux_losses(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        moesaic.on_optimizer_step(model, step)
    model.eval()
    res: dict[str, float] = {}
    with torch.no_grad():
        x, y = data.batch(4096, torch.Generator().manual_seed(12345))
        torch.manual_seed(0)
        xg = x.view(-1, GROUP, x.shape[-1])
        out = model(xg, **_ctx(kind, data, x)).reshape(x.shape[0], -1)
        if edges is None:
            res["mse"] = nn.functional.mse_loss(out, y).item()
        else:
            res["acc"] = (out.argmax(-1) == torch.bucketize(y.squeeze(-1), edges)).double().mean().item()
        s = model.moe.last_stats
        res["experts_per_token"] = s["assignments"] / max(s["tokens"], 1)
        if kind == "smoe_dropout":
            from moesaic.moe.routing.smoe_dropout import set_top_k

            for k in (1, 2, model.moe.num_experts):
                set_top_k(model, k)
                res[f"mse_k{k}"] = nn.functional.mse_loss(model(xg).reshape(y.shape), y).item()
        if kind == "task_gates":
            from moesaic.transforms.task_prune import prune_to_task, used_experts

            sel = torch.cdist(x, data.centres).argmin(-1) == 0
            h = model.inp(x[sel])
            pruned = prune_to_task(model.moe, 0, used_experts(model.moe, h, 0))
            res["task0_experts_kept"] = pruned.num_experts
            res["task0_pruned_vs_full_maxdiff"] = (pruned(h) - model.moe(h, task_id=0)).abs().max().item()
    print(f"{label:>9}: " + "  ".join(f"{k} {v:.4f}" for k, v in res.items()))
    return res


def baseline(cfg: Any) -> Any:
    base = copy.deepcopy(cfg)
    moe = base.model.moe
    moe.router = ROUTERS.get("topk").Config(aux_loss_coef=0.01)
    assert isinstance(moe.router, RouterConfig)
    moe.top_k = min(2, moe.num_experts)
    moe.dispatcher = DISPATCHERS.get("sort").Config()
    return base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--alpha", type=float, default=1.0, help="THOR consistency weight (classification only)")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
    except MoesaicError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not isinstance(cfg.model, RegressionModelConfig):
        print(f"error: model.kind = {cfg.model.kind!r}: paper_toys needs moe_regression", file=sys.stderr)
        return 2
    train_eval(cfg, args.alpha, cfg.model.moe.router.kind)
    if not args.no_baseline:
        train_eval(baseline(cfg), args.alpha, "top-k")
    return 0


if __name__ == "__main__":
    sys.exit(main())
