"""Hugging Face interop: ``from_hf`` imports a transformers causal LM, ``to_hf`` exports a moesaic one.

``from_hf(path_or_model)`` reads ``config.json`` (through ``transformers.AutoConfig``, so defaults and
legacy keys mean what transformers says), refuses a ``model_type`` outside the supported map or a config
field moesaic cannot express (by name), builds a ``decoder_lm`` (a ``bert_encoder`` for BERT-family
encoders: :mod:`moesaic.interop.hf_encoder`) and fills it through the architecture's
declared :class:`~moesaic.interop.mapping.Layout`: every model tensor written exactly once, every file
tensor used or explicitly ignored, every shape checked. The expert weight layout is one of two declared
layouts (``per_expert``: what ``save_pretrained`` and the Hub use; ``fused``: transformers 5's in-memory
``gate_up_proj``); pass ``expert_layout=`` to require one, otherwise the checkpoint's key set must equal
exactly one of them (never a partial match).

``to_hf(model, out_dir, arch=None)`` picks the supported architecture of lowest rank whose features
cover the model (or the one named), writes ``config.json``, (sharded) safetensors tagged with the weight
orientation, and the tokenizer files; the result loads with ``AutoModelForCausalLM.from_pretrained``
without remote code. A model no supported architecture can hold raises :class:`ConversionError` that
names, per architecture, the feature it lacks. See ``docs/hf.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from moesaic.core.errors import ConversionError
from moesaic.interop.common import EXPERT_LAYOUTS, HF_ARCHITECTURES, Arch, build_from_hf_config
from moesaic.interop.export_folder import check_export_folder
from moesaic.interop.mapping import LAYOUT_TAG, LAYOUT_VALUE, Layout, export_weights, import_weights
from moesaic.interop.safetensors_io import WeightReader, short_list, write_sharded

if TYPE_CHECKING:
    from moesaic.models.bert import BertEncoder
    from moesaic.models.decoder import DecoderLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
_GEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def architectures() -> dict[str, Arch]:
    """Every supported architecture by name, in order of preference (registered in
    :data:`~moesaic.interop.common.HF_ARCHITECTURES` by the ``interop/arch_*.py`` files and by plugins)."""
    return dict(sorted(HF_ARCHITECTURES.items(), key=lambda kv: (kv[1].rank, kv[0])))


def _transformers() -> types.ModuleType:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the hf extra is part of `all`
        raise ConversionError("Hugging Face interop needs transformers: pip install 'moesaic[hf]'") from e
    return transformers


class DictReader:
    """The :class:`WeightReader` interface over an in-memory state dict (an already loaded HF model)."""

    def __init__(self, state: dict[str, Tensor], name: str):
        seen: set[int] = set()
        self.state, self.folder = {}, name
        for k, t in state.items():  # tied weights (lm_head = embed_tokens) appear under both names: keep the first
            if id(t) not in seen:
                seen.add(id(t))
                self.state[k] = t

    def keys(self) -> list[str]:
        return sorted(self.state)

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def get(self, key: str) -> Tensor:
        return self.state[key].detach()

    def file_metadata(self, key: str) -> dict[str, str]:
        return {}


def _arch_for(model_type: Any) -> Arch:
    by_type = {a.model_type: a for a in architectures().values()}
    if model_type not in by_type:
        raise ConversionError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(by_type))}")
    return by_type[model_type]


def _pick_layout(arch: Arch, hf_cfg: Any, reader: Any, expert_layout: str | None) -> Layout:
    if expert_layout is not None:
        if expert_layout not in EXPERT_LAYOUTS:
            raise ConversionError(f"expert_layout = {expert_layout!r}: must be one of {', '.join(EXPERT_LAYOUTS)}")
        return arch.layout(hf_cfg, expert_layout)
    have = set(reader.keys())
    scored = []
    for xl in EXPERT_LAYOUTS:
        lay = arch.layout(hf_cfg, xl)
        need = {k for r in lay.rules for k in r.hf_keys}
        if need == {k for k in have if not lay.ignored(k)}:
            return lay
        scored.append((len(need & have), lay))
    return max(scored, key=lambda s: s[0])[1]  # no exact match: import_weights lists every difference


def from_hf(path_or_model: str | os.PathLike[str] | nn.Module, *, expert_layout: str | None = None,
            dtype: torch.dtype | None = None, lazy: bool = False) -> DecoderLM | BertEncoder:
    """A moesaic ``decoder_lm`` with the weights and outputs of a Hugging Face causal LM (a folder with
    ``config.json`` and safetensors, or a loaded ``PreTrainedModel``); for a BERT-family encoder
    (``bert``, ``distilbert``) a ``bert_encoder`` whose output has ``.last_hidden_state``. Returns it in
    eval mode and float32 unless ``dtype`` is given; ``model.hf_info`` records the source, architecture
    and layout. With ``lazy`` (a folder only) the model is built on the meta device and its weights stay in
    the files: ``model.lazy_state`` reads each tensor when asked (streamed conversion, docs/convert.md);
    every name and shape is checked all the same."""
    tf = _transformers()
    if isinstance(path_or_model, nn.Module):
        hf_cfg = getattr(path_or_model, "config", None)
        if hf_cfg is None:
            raise ConversionError(f"{type(path_or_model).__name__} has no .config: not a transformers model")
        arch = _arch_for(getattr(hf_cfg, "model_type", None))
        if lazy:
            raise ConversionError("from_hf(lazy=True) reads a folder, not a loaded model")
        reader: Any = DictReader(path_or_model.state_dict(keep_vars=True), type(path_or_model).__name__)
        source = None
    else:
        folder = Path(path_or_model)
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise ConversionError(f"{folder}: no config.json (not a Hugging Face model folder)")
        try:
            raw = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise ConversionError(f"{cfg_file}: not valid JSON ({e})") from e
        arch = _arch_for(raw.get("model_type"))
        try:
            hf_cfg = tf.AutoConfig.from_pretrained(str(folder))
        except (ValueError, TypeError, KeyError) as e:
            raise ConversionError(f"{cfg_file}: transformers rejects this config ({e})") from e
        reader = WeightReader(folder)
        source = str(folder)
    from moesaic.interop.hf_encoder import EncoderArch, import_encoder

    if isinstance(arch, EncoderArch):
        return import_encoder(arch, hf_cfg, reader, source, dtype, lazy)
    from moesaic.models.decoder import DecoderLM, DecoderLMConfig

    quant = getattr(hf_cfg, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else type(quant).__name__
        raise ConversionError(f"{arch.name}: quantized checkpoint (quantization_config.quant_method = {method!r}) "
                              "is not supported; dequantize it to fp32/bf16 first")
    data = arch.to_moesaic(hf_cfg)
    model = build_from_hf_config(arch.name, DecoderLM, DecoderLMConfig, data, lazy=lazy, dtype=dtype)
    layout = _pick_layout(arch, hf_cfg, reader, expert_layout)
    import_weights(model, reader, layout)
    if dtype is not None and not lazy:
        model = model.to(dtype)
    model.hf_info = {"arch": arch.name, "layout": layout.name, "source": source,
                     **{k: getattr(hf_cfg, k, None) for k in _GEN_FIELDS}}
    return model.eval()


def choose_arch(cfg: Any, arch: str | None = None) -> Arch:
    """The architecture ``to_hf`` uses for the moesaic model config ``cfg``."""
    kind = getattr(cfg, "kind", "decoder_lm")
    archs = {n: a for n, a in architectures().items() if a.kind == kind}
    if arch is not None:
        if arch not in archs:
            raise ConversionError(f"unknown architecture {arch!r}; supported: {', '.join(archs)}")
        problems = archs[arch].unsupported(cfg)
        if problems:
            raise ConversionError(f"cannot export as {arch}: " + "; ".join(problems))
        return archs[arch]
    why = {}
    for name, a in archs.items():
        problems = a.unsupported(cfg)
        if not problems:
            return a
        why[name] = problems[0]
    raise ConversionError("no supported Hugging Face architecture can hold this model: " + "; ".join(why.values()))


def flat_granularity(cfg: Any) -> Any:
    """``cfg`` with every fine-grained MoE section (``granularity: m``) written as the layer it builds: ``m E``
    experts of width ``d_ff / m`` with ``m k`` active, granularity 1 (the same modules and parameters, so the
    export is exact; Hugging Face configs have no granularity)."""
    def flat(moe: Any) -> Any:
        if moe is None or moe.granularity == 1:
            return moe
        sh = moe.shared_experts
        if sh.num > 0 and sh.d_ff is None:
            sh = dataclasses.replace(sh, d_ff=moe.expert_d_ff)
        return dataclasses.replace(moe, d_ff=moe.expert_d_ff, num_experts=moe.routed_experts,
                                   top_k=moe.routed_top_k, granularity=1, shared_experts=sh)

    overrides = [dataclasses.replace(ov, moe=flat(ov.moe)) for ov in cfg.layer_overrides]
    return dataclasses.replace(cfg, moe=flat(cfg.moe), layer_overrides=overrides)


def hf_config(model: nn.Module, arch: str | None = None) -> tuple[Arch, Any]:
    cfg = getattr(model, "cfg", None)
    if cfg is None or getattr(cfg, "kind", None) != "decoder_lm":
        raise ConversionError(f"to_hf exports decoder_lm models, got {type(model).__name__}")
    if getattr(cfg, "module_swaps", None):
        kinds = sorted({k for sw in cfg.module_swaps for k in ("moe", "moefied", "dense") if getattr(sw, k)})
        raise ConversionError(f"to_hf: the model has converted modules outside its config (module_swaps: "
                              f"{', '.join(kinds)} at {cfg.module_swaps[0].modules[0]}, ...); no Hugging Face "
                              "architecture describes them (docs/convert.md, 'hf-export of converted models')")
    cfg = flat_granularity(cfg)
    a = choose_arch(cfg, arch)
    tf = _transformers()
    fields = a.to_hf(cfg)
    info = getattr(model, "hf_info", {}) or {}
    fields.update({k: info.get(k) for k in _GEN_FIELDS})
    cls = tf.CONFIG_MAPPING[a.model_type]
    hf_cfg = cls(**fields)
    hf_cfg.architectures = [a.hf_class]
    hf_cfg.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return a, hf_cfg


def _check_against_transformers(model: nn.Module, a: Arch, hf_cfg: Any) -> None:
    """The fused export must equal the state dict of the transformers model built from ``hf_cfg``."""
    tf = _transformers()
    with torch.device("meta"):
        ref = tf.AutoModelForCausalLM.from_config(hf_cfg)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if hf_cfg.tie_word_embeddings:
        want.pop("lm_head.weight", None)
    got = {k: tuple(v.shape) for k, v in export_weights(model, a.layout(hf_cfg, "fused")).items()}
    bad = [f"{k} {list(got[k])} != {list(want[k])}" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    if set(got) != set(want) or bad:
        raise ConversionError(f"{a.name} export does not match {a.hf_class}: missing {short_list(set(want) - set(got))}"
                              f"; unexpected {short_list(set(got) - set(want))}; shapes {short_list(bad)}")


def copy_tokenizer(src: str | os.PathLike[str] | None, dst: str | os.PathLike[str]) -> list[str]:
    """Copy the tokenizer (and generation config) files found in ``src`` to ``dst``."""
    if src is None or not Path(src).is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file() and f.resolve() != (Path(dst) / name).resolve():
            shutil.copy2(f, Path(dst) / name)
            copied.append(name)
    return copied


def to_hf(model: nn.Module, out_dir: str | os.PathLike[str], arch: str | None = None, *,
          expert_layout: str = "per_expert", tokenizer_dir: str | os.PathLike[str] | None = None,
          max_shard_bytes: int = 5 * 2**30) -> Any:
    """Export ``model`` to ``out_dir`` as a Hugging Face checkpoint; returns the transformers config.

    ``out_dir`` must be new, empty or an earlier moesaic export (:func:`check_export_folder`)."""
    check_export_folder(Path(out_dir))
    if getattr(getattr(model, "cfg", None), "kind", None) == "bert_encoder":
        from moesaic.interop.hf_encoder import copy_sentence_files, export_encoder

        _, enc_cfg = export_encoder(model, out_dir, architectures(), arch, max_shard_bytes)  # type: ignore[arg-type]
        src = tokenizer_dir if tokenizer_dir is not None else (getattr(model, "hf_info", {}) or {}).get("source")
        copy_tokenizer(src, out_dir)
        copy_sentence_files(src, Path(out_dir))
        return enc_cfg
    if expert_layout not in EXPERT_LAYOUTS:
        raise ConversionError(f"expert_layout = {expert_layout!r}: must be one of {', '.join(EXPERT_LAYOUTS)}")
    a, hf_cfg = hf_config(model, arch)
    _check_against_transformers(model, a, hf_cfg)
    tensors = export_weights(model, a.layout(hf_cfg, expert_layout))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg.save_pretrained(str(out))
    write_sharded(tensors, out, max_shard_bytes=max_shard_bytes,
                  metadata={LAYOUT_TAG: LAYOUT_VALUE, "moesaic.expert_layout": expert_layout})
    info = getattr(model, "hf_info", {}) or {}
    copy_tokenizer(tokenizer_dir if tokenizer_dir is not None else info.get("source"), out)
    return hf_cfg
