"""Train an EWA model on the toy regression task, then merge every MoE layer back into one FFN and compare.

Usage: ``python -m moesaic.examples.ewa_merge configs/papers/ewa.yaml [--set k=v ...]``

Experts Weights Averaging (Huang et al. 2023, arXiv 2308.06093; docs/papers.md): the experts are averaged
toward each other after every optimizer step, so at the end the merged FFN (the mean of the experts) should
predict about as well as the MoE it replaces. Prints the held-out MSE of both and the relative spread of the
experts.
"""

from __future__ import annotations

import sys

import torch

import moesaic
from moesaic.examples.toy_regression import load_config, train
from moesaic.transforms.ewa_merge import merge_experts_


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(argv, __doc__)
    if cfg is None:
        return 2
    model, data = train(cfg)
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
