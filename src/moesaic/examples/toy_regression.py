"""Build a model from a YAML config, train it on the toy regression task, print routing statistics.

Usage: ``python -m moesaic.examples.toy_regression configs/toy_layer.yaml [--set k=v ...]``
"""

from __future__ import annotations

import argparse
import sys

import torch

import moesaic
from moesaic.core.errors import MoesaicError
from moesaic.train.datasets.toy import ToyRegression
from moesaic.train.run_config import RunConfig, load_run_config


def load_config(argv: list[str] | None, description: str | None) -> RunConfig | None:
    """Parse ``CONFIG [--set k=v ...]``; returns the run config, or None after printing a one-line error."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        return load_run_config(args.config, args.overrides)
    except MoesaicError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def train(cfg: RunConfig, log: bool = False) -> tuple[torch.nn.Module, ToyRegression]:
    """Train ``cfg.model`` on ``cfg.data`` with AdamW (MSE + aux losses); returns (model, dataset)."""
    torch.manual_seed(cfg.train.seed)
    model = cfg.model.build()
    data = cfg.data.build()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    for step in range(1, cfg.train.max_steps + 1):
        x, y = data.batch(cfg.train.batch_size, gen)
        mse = torch.nn.functional.mse_loss(model(x), y)
        aux = moesaic.collect_aux_losses(model)
        opt.zero_grad(set_to_none=True)
        (mse + aux).backward()
        opt.step()
        moesaic.on_optimizer_step(model, step)
        if log and (step % cfg.train.log_every == 0 or step == 1):
            print(f"step {step:4d}  mse {mse.item():8.4f}  aux {float(aux.detach()):.4f}")
    return model, data


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(argv, __doc__)
    if cfg is None:
        return 2
    model, data = train(cfg, log=True)
    model.eval()
    with torch.no_grad():
        x, y = data.batch(4096, torch.Generator().manual_seed(12345))
        mse = torch.nn.functional.mse_loss(model(x), y).item()
        var = y.var().item()
    print(f"held-out mse {mse:.4f} (target variance {var:.4f}, R^2 {1 - mse / var:.3f})")
    for layer in moesaic.moe_layers(model):
        s = layer.last_stats
        load = s["tokens_per_expert"].double()
        ent = f"{float(s['entropy']):.3f}" if "entropy" in s else "n/a"  # routers without probabilities (EWA)
        print(f"{layer.layer_name}: tokens per expert {load.long().tolist()}  max/mean load "
              f"{(load.max() / load.mean()).item():.2f}  dropped {s['dropped']}  router entropy {ent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
