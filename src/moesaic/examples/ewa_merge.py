"""Train an EWA model on the toy regression task, then merge every MoE layer back into one FFN and compare.

Usage: ``python -m moesaic.examples.ewa_merge configs/papers/ewa.yaml [--set k=v ...]``

Experts Weights Averaging (Huang et al. 2023; routing.md §11): the experts are averaged toward each other
after every optimizer step, so at the end the merged FFN (the mean of the experts) should predict about as
well as the MoE it replaces. Prints the held-out MSE of both and the relative spread of the experts.
"""

from __future__ import annotations

import argparse
import sys

import torch

import moesaic
from moesaic.convert.ewa import merge_experts_
from moesaic.errors import MoesaicError
from moesaic.run_config import load_run_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
    except MoesaicError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(cfg.train.seed)
    model = cfg.model.build()
    data = cfg.data.build()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    for step in range(1, cfg.train.max_steps + 1):
        x, y = data.batch(cfg.train.batch_size, gen)
        loss = torch.nn.functional.mse_loss(model(x), y) + moesaic.collect_aux_losses(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        moesaic.on_optimizer_step(model, step)
    model.eval()
    x, y = data.batch(4096, torch.Generator().manual_seed(12345))
    with torch.no_grad():
        for layer in moesaic.moe_layers(model):
            w = layer.experts.w_down_EDF
            spread = ((w - w.mean(0)).norm() / w.mean(0).norm() / w.shape[0] ** 0.5).item()
            print(f"{layer.layer_name}: relative expert spread {spread:.2e}")
        mse_moe = torch.nn.functional.mse_loss(model(x), y).item()
        merged = merge_experts_(model)
        mse_ffn = torch.nn.functional.mse_loss(model(x), y).item()
    print(f"held-out mse: MoE {mse_moe:.4f}, merged FFN {mse_ffn:.4f} ({len(merged)} layer(s) merged; "
          f"target variance {y.var().item():.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
