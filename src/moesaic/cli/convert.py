"""``moesaic convert hf-import HF_DIR OUT_CKPT``, ``moesaic convert hf-export CKPT HF_DIR [--arch NAME]`` and
``moesaic convert VERB IN... OUT [--set key=value ...]`` for every registered conversion verb (upcycle, ...;
:data:`moesaic.transforms.convert.CONVERTERS`, docs/convert.md).

``hf-import`` writes a moesaic checkpoint (``OUT_CKPT/step-00000000`` with ``config.yaml``,
``model.safetensors`` and ``manifest.json``, ``OUT_CKPT/LATEST``; :mod:`moesaic.train.checkpoint`), with
the Hugging Face ``tokenizer.json`` as the checkpoint tokenizer and the other tokenizer / generation
files as ``hf.NAME``. ``hf-export`` loads a checkpoint (hashes checked) and writes a folder that
``AutoModelForCausalLM.from_pretrained`` loads without remote code, tokenizer files included.
See ``docs/hf.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from moesaic.cli import SubParsers

HF_PREFIX = "hf."


def add_parser(sub: SubParsers) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help="convert checkpoints to and from Hugging Face transformers")
    conv = p.add_subparsers(dest="direction", metavar="DIRECTION", parser_class=type(p))
    conv.required = True
    imp = conv.add_parser("hf-import", help="Hugging Face folder -> moesaic checkpoint")
    imp.add_argument("hf_dir")
    imp.add_argument("out_ckpt")
    imp.add_argument("--expert-layout", choices=["per_expert", "fused"], default=None,
                     help="require this expert weight layout (default: the one the keys match exactly)")
    exp = conv.add_parser("hf-export", help="moesaic checkpoint -> Hugging Face folder")
    exp.add_argument("checkpoint")
    exp.add_argument("hf_dir")
    exp.add_argument("--arch", default=None, help="target architecture (default: the closest supported one)")
    exp.add_argument("--expert-layout", choices=["per_expert", "fused"], default="per_expert")
    exp.add_argument("--max-shard-size", type=int, default=5 * 2**30, metavar="BYTES")
    from moesaic.transforms.convert import CONVERTERS

    for name, verb in CONVERTERS.items():
        v = conv.add_parser(name, help=verb.doc)
        v.add_argument("paths", nargs="+", metavar="IN... OUT",
                       help="input model(s) (moesaic checkpoints or Hugging Face folders), then the output folder")
        v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help=f"a setting of {name} (repeatable; docs/convert.md)")
    return p


def run(args: argparse.Namespace) -> int:
    if args.direction == "hf-import":
        return hf_import(args)
    if args.direction == "hf-export":
        return hf_export(args)
    return convert_verb(args)


def convert_verb(args: argparse.Namespace) -> int:
    """Load the inputs, apply the verb, write OUT atomically (nothing is written when any step fails)."""
    from moesaic.core.config import to_dict
    from moesaic.core.errors import ConfigError
    from moesaic.transforms.convert import CONVERTERS
    from moesaic.transforms.convert_io import check_out_folder, load_inputs, save_converted

    verb = CONVERTERS.get(args.direction)
    if len(args.paths) < 2:
        raise ConfigError("OUT", None, f"convert {verb.name} needs IN... OUT (at least one input and the output "
                                       "folder)", show_value=False)
    *inputs, out = args.paths
    verb.check_inputs(len(inputs))
    cfg = verb.parse_config(args.overrides)
    check_out_folder(out)  # before the (possibly long) load: a refused OUT costs nothing
    model = verb(load_inputs(inputs, lazy=bool(getattr(cfg, "stream", False))), cfg)  # stream: read when written
    step = save_converted(model, out, {"verb": verb.name, "inputs": [str(Path(p).resolve()) for p in inputs],
                                       "config": to_dict(cfg)})
    print(f"{verb.name}: {', '.join(inputs)} -> {step}")
    return 0


def hf_import(args: argparse.Namespace) -> int:
    from moesaic.core.config import dump_yaml, to_dict
    from moesaic.interop.hf import TOKENIZER_FILES, from_hf
    from moesaic.train.checkpoint import gather_model_state, save_checkpoint

    _check_import_folder(Path(args.out_ckpt))
    model = from_hf(args.hf_dir, expert_layout=args.expert_layout)
    src = Path(args.hf_dir)
    extra = {HF_PREFIX + n: (src / n).read_bytes() for n in TOKENIZER_FILES
             if n != "tokenizer.json" and (src / n).is_file()}
    extra[HF_PREFIX + "info.json"] = json.dumps({k: v for k, v in model.hf_info.items() if k != "source"},
                                                sort_keys=True).encode()
    tok = src / "tokenizer.json"
    out = save_checkpoint(args.out_ckpt, 0, config_yaml=dump_yaml({"model": to_dict(model.cfg)}),
                          model_state=gather_model_state(model),
                          tokenizer_json=tok.read_text(encoding="utf-8") if tok.is_file() else None,
                          extra_files=extra)
    print(f"imported {model.hf_info['layout']} from {src} -> {out}")
    return 0


# What an earlier hf-import leaves in OUT_CKPT (and a save cut short leaves beside it).
_IMPORT_ENTRIES = frozenset({"LATEST", "step-00000000", ".LATEST.tmp", ".step-00000000.tmp"})


def _check_import_folder(out: Path) -> None:
    """OUT_CKPT must be new, empty or an earlier import: the import replaces ``step-00000000`` and points
    ``LATEST`` at it, which in a training run's folder would silently swap the model that ``LATEST`` names."""
    from moesaic.core.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError("OUT_CKPT", str(out), "is a file, not a folder")
    if out.is_dir() and not {p.name for p in out.iterdir()} <= _IMPORT_ENTRIES:
        raise ConfigError("OUT_CKPT", str(out), "is a non-empty folder that no hf-import wrote (only LATEST and "
                                                "step-00000000 may be there); give a new or empty folder")


def hf_export(args: argparse.Namespace) -> int:
    from moesaic.interop.hf import to_hf
    from moesaic.train.checkpoint import load_files, load_model, resolve

    ckpt = resolve(args.checkpoint)
    model: Any = load_model(ckpt)  # the attributes hf_info / tokenizer travel on the module
    names = load_files(ckpt)["manifest"]["files"]
    info = ckpt / (HF_PREFIX + "info.json")
    if HF_PREFIX + "info.json" in names:
        model.hf_info = json.loads(info.read_text())
    elif getattr(getattr(model, "tokenizer", None), "eos_id", None) is not None:
        model.hf_info = {"eos_token_id": model.tokenizer.eos_id}
    hf_cfg = to_hf(model, args.hf_dir, args.arch, expert_layout=args.expert_layout,
                   max_shard_bytes=args.max_shard_size)
    out = Path(args.hf_dir)
    for name in names:
        if name.startswith(HF_PREFIX) and name != HF_PREFIX + "info.json":
            (out / name[len(HF_PREFIX):]).write_bytes((ckpt / name).read_bytes())
    tok = getattr(model, "tokenizer", None)
    if tok is not None and getattr(tok, "kind", "") == "bpe":  # a tokenizers JSON: usable by transformers
        (out / "tokenizer.json").write_bytes((ckpt / "tokenizer.json").read_bytes())
        if not (out / "tokenizer_config.json").is_file():
            (out / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|eos|>"}, indent=2) + "\n")
    print(f"exported {ckpt} as {hf_cfg.architectures[0]} -> {out}")
    return 0
