"""The MoE decoding-strategy flags shared by ``moesaic generate`` and ``moesaic eval`` (docs/inference.md):
``--top-k`` (dynamic k), ``--scmoe`` (self-contrast), ``--drop N`` (LLM-Drop), ``--early-exit T``,
``--pregate-route`` (Pre-gated MoE routing), ``--quantize-experts int8|int4|plan|ternary``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MoE decoding strategies")
    g.add_argument("--top-k", dest="moe_top_k", action="append", default=[], metavar="K|LAYER=K",
                   help="dynamic k: route every MoE layer (K) or layer LAYER (LAYER=K, repeatable) to K experts")
    g.add_argument("--scmoe", action="store_true", help="SCMoE self-contrast decoding (strong top-k vs rank-r)")
    g.add_argument("--scmoe-beta", type=float, default=0.5, help="contrast strength (0 = the strong model)")
    g.add_argument("--scmoe-alpha", type=float, default=0.1, help="plausibility cut (0 = none)")
    g.add_argument("--scmoe-rank", type=int, default=2, help="the weak pass routes to the expert of this rank")
    g.add_argument("--drop", type=int, default=0, metavar="N", help="LLM-Drop: drop the N most redundant sublayers")
    g.add_argument("--drop-kind", choices=["attn", "mlp", "both"], default="attn")
    g.add_argument("--drop-calib", default=None, metavar="TEXT_FILE",
                   help="calibration text for --drop (default: training windows of the checkpoint's data)")
    g.add_argument("--drop-calib-windows", type=int, default=32)
    g.add_argument("--early-exit", type=float, default=None, metavar="T", help="per-token early-exit threshold")
    g.add_argument("--early-exit-criterion", choices=["confidence", "similarity"], default="confidence")
    g.add_argument("--early-exit-min-layer", type=int, default=1)
    g.add_argument("--pregate-route", action="store_true",
                   help="Pre-gated MoE: route each MoE layer but the first by its router on the previous MoE "
                        "layer's input (changes outputs; exact prefetch hints)")
    g.add_argument("--quantize-experts", choices=["none", "int8", "int4", "plan", "ternary"], default="none",
                   help="weight-only group-wise experts (dequantized per active expert): int8, int4, plan "
                        "(hot experts int8, cold int4, never-used pruned, from routing on calibration windows), "
                        "or ternary (QMoE-style, dictionary-coded, decoded per active expert)")
    g.add_argument("--quant-group", type=int, default=64,
                   help="input columns per quantization scale (ternary: 0 = one scale per row)")
    g.add_argument("--ternary-threshold", type=float, default=0.7, metavar="T",
                   help="ternary: weights with |w| <= T * mean|w| of their group become 0 (TWN rule)")
    g.add_argument("--ternary-code-bits", type=int, default=16, choices=[8, 16],
                   help="ternary: dictionary codeword bits")
    g.add_argument("--ternary-gptq", action="store_true",
                   help="ternary: choose the values by GPTQ on calibration activations (--quant-calib-windows)")
    g.add_argument("--quant-hot", type=float, default=0.5, metavar="F",
                   help="plan: fraction of the used experts kept in int8")
    g.add_argument("--quant-calib-windows", type=int, default=32, metavar="N",
                   help="plan: calibration windows (the checkpoint's training data, or --drop-calib TEXT_FILE)")


def _calibration(args: argparse.Namespace, model: nn.Module, n: int | None = None,
                 flag: str = "--drop-calib-windows") -> list[dict[str, torch.Tensor]]:
    from moesaic.core.errors import ConfigError

    n = args.drop_calib_windows if n is None else n
    if n < 1:
        raise ConfigError(flag, n, "must be >= 1")
    seq = min(128, getattr(model, "max_seq_len", 128) or 128)
    if args.drop_calib is not None:
        tok = getattr(model, "tokenizer", None)
        path = Path(args.drop_calib)
        if tok is None:
            raise ConfigError("--drop-calib", args.drop_calib, "the checkpoint has no tokenizer to read text with")
        if not path.is_file():
            raise ConfigError("--drop-calib", args.drop_calib, "is not a readable file")
        ids = torch.tensor(tok.encode(path.read_text()), dtype=torch.long)
        wins = [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, seq)][:n]
        if not wins:
            raise ConfigError("--drop-calib", args.drop_calib, f"holds fewer than {seq} tokens")
        return [{"input_ids": torch.stack(wins[i:i + 8])} for i in range(0, len(wins), 8)]
    run_cfg = getattr(model, "run_config", None)
    if run_cfg is None:
        raise ConfigError("--drop-calib", None, "needed: the checkpoint names no training data")
    data = run_cfg.data.build()
    loader = data.loader(seed=1234)
    return [{"input_ids": loader.next_batch(min(8, n - i))["input_ids"]} for i in range(0, n, 8)]


def apply(args: argparse.Namespace, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """The model with the requested strategies applied (transforms in place, wrappers around it), and a
    description of what was applied for the output."""
    from moesaic.core.errors import ConfigError
    from moesaic.inference.dynamic_k import parse_top_k, set_top_k_
    from moesaic.inference.early_exit import EarlyExitLM
    from moesaic.inference.llm_drop import drop_sublayers_
    from moesaic.inference.scmoe import scmoe_

    info: dict[str, Any] = {}
    mode = getattr(args, "quantize_experts", "none")
    if mode != "none":
        from moesaic.inference.quant import QuantConfig, quantize_experts_
        from moesaic.inference.quant_plan import expert_usage

        if not 0.0 <= args.quant_hot <= 1.0:
            raise ConfigError("--quant-hot", args.quant_hot, "must be in [0, 1]")
        qcfg = QuantConfig(bits=4 if mode == "int4" else 8, group_size=args.quant_group, plan=mode == "plan",
                           hot_fraction=args.quant_hot, ternary=mode == "ternary",
                           ternary_threshold=args.ternary_threshold, code_bits=args.ternary_code_bits,
                           gptq=bool(getattr(args, "ternary_gptq", False)))
        calib = (_calibration(args, model, args.quant_calib_windows, "--quant-calib-windows")
                 if mode == "plan" or qcfg.gptq else None)
        usage = expert_usage(model, calib) if mode == "plan" and calib is not None else None
        hess = None
        if qcfg.gptq and calib is not None and mode == "ternary":
            from moesaic.inference.quant_gptq import expert_hessians

            hess = expert_hessians(model, calib)
        q = quantize_experts_(model, qcfg, usage, hess)
        bits = [b for x in q.values() for b in x.bits_E]
        info["quantized"] = {"mode": mode, "group_size": args.quant_group, "int8_experts": bits.count(8),
                             "int4_experts": bits.count(4), "pruned_experts": bits.count(0),
                             "expert_bytes": sum(x.nbytes() for x in q.values())}
        if mode == "ternary":
            from moesaic.inference.quant_ternary import TernaryExperts

            tq = [x for x in q.values() if isinstance(x, TernaryExperts)]
            n = sum(x.num_weights() for x in tq)
            info["quantized"].update(ternary_experts=bits.count(2), gptq=qcfg.gptq,
                                     bits_per_weight=8 * info["quantized"]["expert_bytes"] / n,
                                     zero_fraction=sum(x.zero_fraction() * x.num_weights() for x in tq) / n)
    if getattr(args, "pregate_route", False):
        from moesaic.inference.offload.pregate_route import route_by_pregate_

        route_by_pregate_(model)
        info["pregate_route"] = True
    if args.moe_top_k:
        k = parse_top_k(args.moe_top_k)
        set_top_k_(model, k)
        info["top_k"] = k
    if args.drop:
        h = drop_sublayers_(model, args.drop, _calibration(args, model), kind=args.drop_kind)
        names = {id(b): i for i, b in enumerate(model.model.layers)}  # type: ignore[union-attr, arg-type]
        info["dropped"] = [f"model.layers.{names[id(blk)]}.{attr}" for blk, attr, _ in h.dropped]
    if args.scmoe and args.early_exit is not None:
        raise ConfigError("--scmoe", True, "cannot be combined with --early-exit")
    if args.scmoe:
        model = scmoe_(model, args.scmoe_beta, args.scmoe_alpha, args.scmoe_rank)
        info["scmoe"] = {"beta": args.scmoe_beta, "alpha": args.scmoe_alpha, "rank": args.scmoe_rank}
    elif args.early_exit is not None:
        model = EarlyExitLM(model, args.early_exit, args.early_exit_criterion, args.early_exit_min_layer)
        info["early_exit"] = {"threshold": args.early_exit, "criterion": args.early_exit_criterion}
    return model, info
