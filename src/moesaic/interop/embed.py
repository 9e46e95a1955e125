"""Sentence embeddings from an encoder, pooled the way the checkpoint's sentence-transformers files say.

Reimers & Gurevych 2019, "Sentence-BERT": a sentence embedding is a pooling of the encoder's
``last_hidden_state`` over the real tokens (mean, or the first ``[CLS]`` token, or the max), optionally
L2-normalised. A sentence-transformers folder declares its modules in ``modules.json`` (``Transformer``,
``Pooling`` with ``1_Pooling/config.json``, ``Normalize``) and its truncation length in
``sentence_bert_config.json`` (``max_seq_length``); :func:`embed` reads exactly these and refuses, with a
typed error, a pooling mode or module it does not implement (docs/hf.md, "Sentence embeddings").
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesaic.core.errors import ConfigError, ConversionError

#: sentence-transformers pooling flags -> moesaic pooling names (the ones :func:`pool` implements).
POOLING_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
#: Flags sentence-transformers knows that moesaic does not implement.
UNSUPPORTED_FLAGS = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
POOLINGS = ("mean", "cls", "max")


@dataclasses.dataclass(frozen=True)
class SentenceConfig:
    """How a checkpoint turns token states into a sentence embedding."""

    pooling: str
    normalize: bool
    max_length: int | None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e


def pooling_from_file(path: Path) -> str:
    """The one pooling mode a sentence-transformers ``Pooling`` config enables."""
    data = _read_json(path)
    for flag in UNSUPPORTED_FLAGS:
        if data.get(flag):
            raise ConfigError(f"{path}:{flag}", True, f"pooling mode not supported by moesaic.embed; supported: "
                              f"{', '.join(POOLING_FLAGS)}")
    modes = [name for flag, name in POOLING_FLAGS.items() if data.get(flag)]
    if len(modes) != 1:
        raise ConfigError(f"{path}:pooling_mode_*", modes, "exactly one pooling mode must be enabled "
                          "(concatenated poolings are not supported)")
    return modes[0]


def sentence_config(folder: str | os.PathLike[str]) -> SentenceConfig | None:
    """The pooling, normalisation and truncation declared in ``folder``; None when it declares none."""
    root = Path(folder)
    pooling, normalize = None, False
    modules = root / "modules.json"
    if modules.is_file():
        for module in _read_json(modules):
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind == "Pooling":
                pooling = pooling_from_file(root / str(module.get("path", "")) / "config.json")
            elif kind == "Normalize":
                normalize = True
            elif kind != "Transformer":
                raise ConfigError(f"{modules}:{module.get('path')}", module.get("type"),
                                  "sentence-transformers module not supported by moesaic.embed "
                                  "(Transformer, Pooling and Normalize are)")
    elif (root / "1_Pooling" / "config.json").is_file():
        pooling = pooling_from_file(root / "1_Pooling" / "config.json")
    if pooling is None:
        return None
    max_length = None
    if (root / "sentence_bert_config.json").is_file():
        max_length = _read_json(root / "sentence_bert_config.json").get("max_seq_length")
    return SentenceConfig(pooling, normalize, int(max_length) if max_length else None)


def pool(h_BSD: Tensor, mask_BS: Tensor, pooling: str) -> Tensor:
    """``[B, D]`` pooled over the real tokens (``mask_BS`` 1) as sentence-transformers does it."""
    if pooling == "cls":
        return h_BSD[:, 0]
    m_BS1 = mask_BS.unsqueeze(-1).to(h_BSD.dtype)
    if pooling == "mean":
        return (h_BSD * m_BS1).sum(1) / m_BS1.sum(1).clamp_min(1e-9)
    if pooling == "max":
        return h_BSD.masked_fill(m_BS1 == 0, -1e9).max(1).values
    raise ConfigError("pooling", pooling, f"must be one of {', '.join(POOLINGS)}")


class _Batcher:
    """Turns texts into padded ``input_ids`` / ``attention_mask`` / ``token_type_ids`` with any of the three
    tokenizer kinds :func:`embed` accepts, truncating to ``max_length`` tokens (special tokens included)."""

    def __init__(self, tokenizer: Any, max_length: int | None, pad_id: int):
        from tokenizers import Tokenizer

        self.max_length, self.pad_id = max_length, pad_id
        self.hf: Any = None
        self.fast: Tokenizer | None = None
        if isinstance(tokenizer, (str, os.PathLike)):
            path = Path(tokenizer)
            path = path / "tokenizer.json" if path.is_dir() else path
            if not path.is_file():
                raise ConversionError(f"{tokenizer}: no tokenizer.json")
            tokenizer = Tokenizer.from_file(str(path))
        if isinstance(tokenizer, Tokenizer):
            self.fast = Tokenizer.from_str(tokenizer.to_str())  # a copy: padding/truncation are set below
            self.fast.no_padding()
            self.fast.no_truncation()
            if max_length is not None:
                self.fast.enable_truncation(max_length)
        elif callable(tokenizer) and hasattr(tokenizer, "model_input_names"):
            self.hf = tokenizer
        else:
            raise ConfigError("tokenizer", type(tokenizer).__name__, "must be a path, a tokenizers.Tokenizer or a "
                              "transformers tokenizer")

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        if self.hf is not None:
            kw: dict[str, Any] = {"truncation": True, "max_length": self.max_length} if self.max_length else {}
            enc = self.hf(texts, padding=True, return_tensors="pt", **kw)
            return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        assert self.fast is not None
        encs = self.fast.encode_batch(texts)
        S = max(len(e.ids) for e in encs)
        ids_BS = torch.full((len(encs), S), self.pad_id, dtype=torch.long)
        mask_BS = torch.zeros(len(encs), S, dtype=torch.long)
        types_BS = torch.zeros(len(encs), S, dtype=torch.long)
        for b, e in enumerate(encs):
            n = len(e.ids)
            ids_BS[b, :n] = torch.tensor(e.ids)
            mask_BS[b, :n] = torch.tensor(e.attention_mask)
            types_BS[b, :n] = torch.tensor(e.type_ids)
        return {"input_ids": ids_BS, "attention_mask": mask_BS, "token_type_ids": types_BS}


def _declared(model: nn.Module, tokenizer: Any) -> SentenceConfig | None:
    """The sentence config of the model's source folder, else of the tokenizer's folder."""
    for folder in ((getattr(model, "hf_info", None) or {}).get("source"), tokenizer):
        if isinstance(folder, (str, os.PathLike)) and Path(folder).is_dir():
            found = sentence_config(folder)
            if found is not None:
                return found
    return None


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 32, *,
          pooling: str | None = None, normalize: bool | None = None, max_length: int | None = None) -> Tensor:
    """Sentence embeddings ``[len(texts), d_model]`` (float32, on the CPU) of ``texts``.

    ``model``: an encoder whose forward returns ``.last_hidden_state`` (``from_hf`` of a BERT-family
    folder). ``tokenizer``: a folder holding ``tokenizer.json`` (or the file), a ``tokenizers.Tokenizer``
    or a transformers tokenizer. Pooling, normalisation and truncation length come from the
    sentence-transformers files of the model's source folder (``model.hf_info["source"]``) or of the
    tokenizer folder; ``pooling`` (``mean``, ``cls``, ``max``), ``normalize`` and ``max_length`` override
    them. Without such files, ``pooling`` must be given (normalisation then defaults to off, truncation to
    the model's ``max_position_embeddings``). Batches are formed longest text first; row ``i`` of the
    result is ``texts[i]``."""
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "must be >= 1")
    declared = _declared(model, tokenizer)
    if pooling is None and declared is None:
        raise ConfigError("pooling", None, "no sentence-transformers pooling config (modules.json, "
                          "1_Pooling/config.json) found next to the model or tokenizer: pass pooling=")
    pooling = pooling if pooling is not None else declared.pooling  # type: ignore[union-attr]
    if pooling not in POOLINGS:
        raise ConfigError("pooling", pooling, f"must be one of {', '.join(POOLINGS)}")
    normalize = normalize if normalize is not None else (declared.normalize if declared else False)
    cfg = getattr(model, "cfg", None)
    if max_length is None:
        max_length = declared.max_length if declared and declared.max_length else None
        max_length = max_length or getattr(cfg, "max_position_embeddings", None)
    pad_id = getattr(cfg, "pad_token_id", None) or 0
    batcher = _Batcher(tokenizer, max_length, pad_id)
    use_types = getattr(cfg, "type_vocab_size", 0) > 0
    device = next(model.parameters()).device
    # Longest texts first (by characters, as sentence-transformers orders them) so that each batch pads
    # little; the rows are put back in input order at the end.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out: list[Tensor] = []
    for start in range(0, len(texts), batch_size):
        batch = batcher([texts[i] for i in order[start:start + batch_size]])
        kw = {"token_type_ids": batch["token_type_ids"].to(device)} if use_types and "token_type_ids" in batch else {}
        mask_BS = batch["attention_mask"].to(device)
        h_BSD = model(batch["input_ids"].to(device), attention_mask=mask_BS, **kw).last_hidden_state
        e_BD = pool(h_BSD.float(), mask_BS, pooling)
        out.append((F.normalize(e_BD, p=2, dim=1) if normalize else e_BD).cpu())
    if not out:
        return torch.zeros(0, getattr(cfg, "d_model", 0))
    sorted_ND = torch.cat(out)
    result_ND = torch.empty_like(sorted_ND)
    result_ND[torch.tensor(order)] = sorted_ND
    return result_ND
