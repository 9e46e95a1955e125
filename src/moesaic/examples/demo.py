"""`make demo`: train the DeepSeekMoE-style LM of ``configs/demo.yaml`` on Shakespeare and its dense twin
(same active parameters, same data order and tokens), then print both validation losses, tokens/s and a
sample from the MoE model. A classifier config (``configs/encoder_genre.yaml``) prints validation accuracy
and the majority-class baseline instead of a sample.

Usage: ``python -m moesaic.examples.demo [configs/demo.yaml] [--set k=v ...] [--out runs/demo]``. ``--out`` must
be new, empty, or the folder of an earlier demo run (``moesaic.examples.demo_output``); only the demo's own
``moe/`` and ``dense/`` there are replaced.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moesaic.core.config import to_dict
from moesaic.core.errors import MoesaicError
from moesaic.examples.demo_output import prepare_demo_folder
from moesaic.models.transformer import TransformerConfig
from moesaic.moe.layer import MoEConfig
from moesaic.train.run_config import RunConfig, load_run_config


def active_ffn_width(moe: MoEConfig) -> int:
    """Width of the dense FFN with the MoE layer's active parameters: routed ``top_k`` experts plus shared."""
    sh = moe.shared_experts
    return moe.routed_top_k * moe.expert_d_ff + sh.num * (sh.d_ff or moe.expert_d_ff)


def dense_twin(cfg: RunConfig) -> RunConfig:
    """The dense model with the same active parameters per token: every MoE FFN replaced by a dense FFN of the
    active width (routers excepted: E*D parameters per layer, <1% here)."""
    raw = copy.deepcopy(to_dict(cfg))
    m = cfg.model
    if not isinstance(m, TransformerConfig):
        raise MoesaicError(f"the demo needs a transformer model (decoder_lm or encoder_classifier), not {m.kind!r}")
    if m.moe is None:
        raise MoesaicError("the demo config must have model.moe set")
    width = active_ffn_width(m.moe)
    if any(m.layer_spec(i)[1] is None and m.layer_spec(i)[2] != width for i in range(m.num_layers)):
        raise MoesaicError(f"dense layers of the MoE model must have d_ff = active MoE width ({width}) "
                           "so that the twin matches")
    raw["model"].update(moe=None, d_ff=width, first_k_dense=0, layer_overrides=[])
    return load_run_config(data=raw)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active per token) parameters; active counts only top-k routed experts of each MoE layer."""
    from moesaic.moe.api import moe_layers

    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in moe_layers(model):
        per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.num_experts
        inactive += per_expert * (layer.num_experts - layer.top_k) + layer.router.weight.numel()
    return total, total - inactive


def train_one(name: str, cfg: RunConfig, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from moesaic.train.trainer import Trainer

    t0 = time.perf_counter()
    tr = Trainer(cfg, out, resume=False, log=log)
    total, active = count_params(tr.model)
    log(f"[{name}] {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token")
    tr.run()
    s = dict(tr.summary, total_params=total, active_params=active, wall_s=time.perf_counter() - t0)
    s["trainer"] = tr
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default="configs/demo.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--prompt", default="ROMEO.\n")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        cfg = load_run_config(args.config, args.overrides)
        dense = dense_twin(cfg)
        out = Path(args.out)
        prepare_demo_folder(out)
        t0 = time.perf_counter()
        moe = train_one("moe", cfg, out / "moe", log)
        den = train_one("dense", dense, out / "dense", log)
    except MoesaicError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if moe["trainer"].task.kind == "classification":
        return _print_classification(cfg, moe, den, time.perf_counter() - t0, out)
    model, tok = moe["trainer"].model, moe["trainer"].data.tokenizer
    ids = torch.tensor([tok.encode(args.prompt)])
    sample = model.generate(ids, max_new_tokens=80, temperature=0.8, top_p=0.95,
                            generator=torch.Generator().manual_seed(0))
    tokens = moe["steps"] * cfg.train.batch_size * cfg.data.seq_len if hasattr(cfg.data, "seq_len") else 0
    print(f"\nShakespeare LM, {moe['steps']} steps x {cfg.train.batch_size} x {getattr(cfg.data, 'seq_len', '?')}"
          f" = {tokens} training tokens each")
    print(f"{'model':<8}{'params':>10}{'active':>10}{'val_loss':>10}{'val_ppl':>10}{'tokens/s':>10}")
    for name, s in (("moe", moe), ("dense", den)):
        print(f"{name:<8}{s['total_params'] / 1e6:>9.2f}M{s['active_params'] / 1e6:>9.2f}M"
              f"{s.get('val_loss', float('nan')):>10.4f}{s.get('val_ppl', float('nan')):>10.1f}"
              f"{s['tokens_per_s']:>10.0f}")
    print(f"MoE - dense val loss: {moe.get('val_loss', 0) - den.get('val_loss', 0):+.4f}; "
          f"throughput MoE/dense {moe['tokens_per_s'] / max(den['tokens_per_s'], 1e-9):.2f}; "
          f"total {time.perf_counter() - t0:.0f}s; checkpoints in {out}/")
    print(f"\nsample (MoE, temperature 0.8, top-p 0.95):\n{tok.decode(sample[0].tolist())}")
    return 0


def _print_classification(cfg: RunConfig, moe: dict[str, Any], den: dict[str, Any], wall_s: float, out: Path) -> int:
    """The MoE/dense table of a classifier (e.g. ``configs/encoder_genre.yaml``): val accuracy, not a sample."""
    data = moe["trainer"].data
    base = data.majority_baseline() if hasattr(data, "majority_baseline") else float("nan")
    seq = getattr(cfg.data, "seq_len", "?")
    print(f"\n{cfg.data.kind} classification, {moe['steps']} steps x {cfg.train.batch_size} sequences x {seq} "
          f"tokens; validation: {len(data.eval_batches(1))} passages of unseen plays, majority baseline {base:.4f}")
    print(f"{'model':<8}{'params':>10}{'active':>10}{'val_loss':>10}{'val_acc':>10}{'tokens/s':>10}")
    for name, s in (("moe", moe), ("dense", den)):
        print(f"{name:<8}{s['total_params'] / 1e6:>9.2f}M{s['active_params'] / 1e6:>9.2f}M"
              f"{s.get('val_loss', float('nan')):>10.4f}{s.get('val_accuracy', float('nan')):>10.4f}"
              f"{s['tokens_per_s']:>10.0f}")
    print(f"MoE - dense val accuracy: {moe.get('val_accuracy', 0) - den.get('val_accuracy', 0):+.4f}; "
          f"throughput MoE/dense {moe['tokens_per_s'] / max(den['tokens_per_s'], 1e-9):.2f}; "
          f"total {wall_s:.0f}s; checkpoints in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
