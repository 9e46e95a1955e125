"""Import and export of Hugging Face encoders (BERT family) as moesaic ``bert_encoder`` models.

An :class:`EncoderArch` adds to :class:`~moesaic.interop.common.Arch` what encoder checkpoints vary in:
task models (``BertForMaskedLM``, ``DistilBertForSequenceClassification``, ...) keep the encoder under a
prefix (``bert.``, ``distilbert.``) next to heads that are not part of it, and BERT's pooler is present
or not depending on the class that saved the checkpoint. The pooler is imported when the checkpoint has
it, so an export loads back with the same ``pooler_output``; task heads are ignored and listed in
``model.hf_info["ignored"]``. The same completeness checks as for decoders apply
(:func:`~moesaic.interop.mapping.import_weights`); before them, the config fields that fix tensor shapes
are compared with the weights so that a wrong config is reported by field name. See docs/hf.md,
"BERT-family encoders".
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from moesaic.core.errors import ConversionError
from moesaic.interop.common import Arch, build_from_hf_config
from moesaic.interop.mapping import LAYOUT_TAG, LAYOUT_VALUE, Layout, export_weights, import_weights
from moesaic.interop.safetensors_io import WeightReader, short_list, write_sharded
from moesaic.models.bert import BertEncoder, BertEncoderConfig

#: Files next to the weights that describe how sentence-transformers uses the model (docs/hf.md).
SENTENCE_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


@dataclasses.dataclass(frozen=True)
class EncoderArch(Arch):
    """An encoder architecture. ``encoder_layout(hf_config, pooler)`` replaces ``layout`` (which gives the
    layout with the pooler); ``shape_fields(hf_config)`` lists ``(config field, value, tensor key, dim)``
    that the weights must agree with; ``auto_kwargs(pooler)`` are the extra arguments of
    ``AutoModel.from_config`` that build the same model (BERT's ``add_pooling_layer``)."""

    kind: str = "bert_encoder"
    prefix: str = ""
    pooler_keys: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    encoder_layout: Callable[[Any, bool], Layout] | None = None
    shape_fields: Callable[[Any], list[tuple[str, int, str, int]]] | None = None
    auto_kwargs: Callable[[bool], dict[str, Any]] = lambda pooler: {}


class PrefixView:
    """A weight reader with the task model's prefix (``bert.``) removed from the encoder's keys."""

    def __init__(self, reader: Any, prefix: str):
        self.reader, self.folder = reader, reader.folder
        strip = bool(prefix) and any(k.startswith(prefix) for k in reader.keys())
        self.names = {(k[len(prefix):] if strip and k.startswith(prefix) else k): k for k in reader.keys()}

    def keys(self) -> list[str]:
        return sorted(self.names)

    def __contains__(self, key: str) -> bool:
        return key in self.names

    def get(self, key: str) -> Tensor:
        return self.reader.get(self.names[key])

    def read(self, key: str) -> Tensor:
        return getattr(self.reader, "read", self.reader.get)(self.names[key])

    def shape(self, key: str) -> tuple[int, ...]:
        if hasattr(self.reader, "shape"):
            return tuple(self.reader.shape(self.names[key]))
        return tuple(self.reader.get(self.names[key]).shape)

    def file_metadata(self, key: str) -> dict[str, str]:
        return dict(self.reader.file_metadata(self.names[key]))


def _check_shapes(arch: EncoderArch, hf_cfg: Any, view: PrefixView) -> None:
    """Name the config field whose value the weights contradict (before the per-tensor checks)."""
    assert arch.shape_fields is not None
    bad = []
    for field, value, key, dim in arch.shape_fields(hf_cfg):
        if key in view:
            shape = view.shape(key)
            if shape[dim] != value:
                bad.append(f"config field {field} = {value} but {key} has shape {list(shape)}")
    layer_re = re.compile(r"^(?:encoder|transformer)\.layer\.(\d+)\.")
    found = {int(m.group(1)) for k in view.keys() if (m := layer_re.match(k))}
    n_field = "num_hidden_layers" if arch.model_type == "bert" else "n_layers"
    n = int(getattr(hf_cfg, n_field))
    if found and found != set(range(n)):
        bad.append(f"config field {n_field} = {n} but the weights hold layers {short_list(str(i) for i in found)}")
    if bad:
        raise ConversionError(f"{arch.name}: the config does not match the weights: " + "; ".join(bad))


def import_encoder(arch: EncoderArch, hf_cfg: Any, reader: Any, source: str | None,
                   dtype: torch.dtype | None = None, lazy: bool = False) -> BertEncoder:
    """A ``bert_encoder`` with the weights of the checkpoint behind ``reader`` (eval mode); with ``lazy``
    built on the meta device, its weights read when needed (``model.lazy_state``, as in ``from_hf``)."""
    assert arch.encoder_layout is not None
    view = PrefixView(reader, arch.prefix)
    _check_shapes(arch, hf_cfg, view)
    pooler = bool(arch.pooler_keys) and all(k in view for k in arch.pooler_keys)
    data = arch.to_moesaic(hf_cfg)
    data["pooler"] = pooler
    model = build_from_hf_config(arch.name, BertEncoder, BertEncoderConfig, data, lazy=lazy, dtype=dtype)
    layout = arch.encoder_layout(hf_cfg, pooler)
    layout.ignore_hf.extend((h, "task head, not part of the encoder") for h in arch.heads)
    import_weights(model, cast(WeightReader, view), layout)  # the reader interface; cast: no Protocol
    if dtype is not None and not lazy:
        model = model.to(dtype)
    ignored = [k for k in view.keys() if any(re.search(h, k) for h in arch.heads)]
    model.hf_info = {"arch": arch.name, "layout": layout.name, "source": source, "ignored": ignored,
                     "pad_token_id": getattr(hf_cfg, "pad_token_id", None)}
    return model.eval()


def _choose(archs: dict[str, Arch], cfg: BertEncoderConfig, name: str | None) -> EncoderArch:
    enc = {n: a for n, a in archs.items() if isinstance(a, EncoderArch)}
    if name is not None and name not in enc:
        raise ConversionError(f"unknown encoder architecture {name!r}; supported: {', '.join(enc)}")
    why = []
    for n, a in enc.items():
        if name is not None and n != name:
            continue
        problems = a.unsupported(cfg)
        if not problems:
            return a
        why.append(f"{n} lacks {problems[0]}")
    raise ConversionError("no supported Hugging Face encoder architecture can hold this model: " + "; ".join(why))


def _check_against_transformers(model: BertEncoder, a: EncoderArch, hf_cfg: Any, tensors: dict[str, Tensor]) -> None:
    import transformers

    with torch.device("meta"):
        ref = transformers.AutoModel.from_config(hf_cfg, **a.auto_kwargs(model.cfg.pooler))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    bad = [f"{k} {list(got[k])} != {list(want[k])}" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    if set(got) != set(want) or bad:
        raise ConversionError(f"{a.name} export does not match {a.hf_class}: missing {short_list(set(want) - set(got))}"
                              f"; unexpected {short_list(set(got) - set(want))}; shapes {short_list(bad)}")


def copy_sentence_files(src: str | os.PathLike[str] | None, dst: Path) -> list[str]:
    """Copy sentence-transformers' module files (``modules.json`` and the module folders it names, e.g.
    ``1_Pooling/``) so that :func:`moesaic.embed` pools the export like the source."""
    if src is None or not Path(src).is_dir():
        return []
    src, copied = Path(src), []
    for name in SENTENCE_FILES:
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if (src / "modules.json").is_file():
        for module in json.loads((src / "modules.json").read_text()):
            sub = str(module.get("path") or "")
            if sub and (src / sub).is_dir() and (src / sub).resolve() != (dst / sub).resolve():
                shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)
                copied.append(sub + "/")
    return copied


def export_encoder(model: BertEncoder, out_dir: str | os.PathLike[str], archs: dict[str, Arch], arch: str | None,
                   max_shard_bytes: int) -> tuple[EncoderArch, Any]:
    """Write ``model`` as the first encoder architecture that holds it; returns it and the HF config."""
    import transformers

    a = _choose(archs, model.cfg, arch)
    assert a.encoder_layout is not None
    hf_cfg = transformers.CONFIG_MAPPING[a.model_type](**a.to_hf(model.cfg))
    hf_cfg.architectures = [a.hf_class]
    hf_cfg.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    tensors = export_weights(model, a.encoder_layout(hf_cfg, model.cfg.pooler))
    _check_against_transformers(model, a, hf_cfg, tensors)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg.save_pretrained(str(out))
    write_sharded(tensors, out, max_shard_bytes=max_shard_bytes, metadata={LAYOUT_TAG: LAYOUT_VALUE})
    return a, hf_cfg
