"""The user's own text files: ``data: {kind: text, files: [a.txt, ...]}`` trains a language model on them.

Each file is one document (followed by ``<|eos|>``), read by :func:`moesaic.train.text_files.read_text_file`
(typed :class:`~moesaic.core.errors.DataError` for a missing, empty, binary or non-UTF-8 file, and for one
that changes or vanishes while it is read). Validation text is ``val_files`` when given, otherwise the last
``val_fraction`` of the token stream. The tokenizer is byte-level BPE or characters trained on the training
files (cached under ``$MOESAIC_CACHE/text/<hash of the contents and settings>``), or the one in
``tokenizer_file`` (a moesaic or Hugging Face ``tokenizer.json``, e.g. a checkpoint's, to continue training a
model on new text). The loader's position records a hash of the training stream, so ``--resume`` after the
text changed stops with :class:`~moesaic.core.errors.CheckpointMismatchError` instead of continuing on other
data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np
import torch

from moesaic.core.config import require, rule
from moesaic.core.errors import CheckpointMismatchError, DataError
from moesaic.train.datasets.base import DATASETS
from moesaic.train.datasets.shakespeare import PlayTextConfig, _atomic_write, _encode, cache_root
from moesaic.train.datasets.shakespeare import ShakespeareData as _PackedText
from moesaic.train.loader import PackedLoader
from moesaic.train.text_files import read_text_file
from moesaic.train.tokenizer import BPETokenizer, CharTokenizer, TextTokenizer


@dataclasses.dataclass
class TextConfig(PlayTextConfig):
    files: list[str] = dataclasses.field(default_factory=list)
    val_files: list[str] = dataclasses.field(default_factory=list)
    val_fraction: float = rule(0.1, gt=0.0, lt=1.0, doc="share of the stream held out when val_files is empty")
    tokenizer_file: str | None = None
    seq_len: int = rule(128, ge=2)
    eval_windows: int = rule(64, ge=1, doc="validation windows of seq_len tokens used by eval")

    def validate(self, path: str) -> None:
        require(bool(self.files), f"{path}.files", self.files, "must name at least one text file")
        for field in ("files", "val_files"):
            for i, f in enumerate(getattr(self, field)):
                require(isinstance(f, str) and bool(f.strip()), f"{path}.{field}.{i}", f, "must be a file path")


def load_tokenizer_file(path: str) -> TextTokenizer:
    """A ``tokenizer.json`` (moesaic char/BPE or Hugging Face); :class:`DataError` when it is not one."""
    text = read_text_file(path, "data.tokenizer_file")
    try:
        return TextTokenizer.from_json(text)
    except Exception as e:  # noqa: BLE001 - any unparsable file is the same user error
        raise DataError(f"data.tokenizer_file = '{path}': not a tokenizer.json ({type(e).__name__}: "
                        f"{str(e)[:120]})") from None


class TextLoader(PackedLoader):
    """:class:`PackedLoader` whose position also names the training stream's hash (resume on other text
    is a mismatch, not a silent continuation)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int, digest: str):
        self.digest = digest
        super().__init__(tokens, seq_len, seed)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "text_sha256": self.digest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("text_sha256") != self.digest:
            raise CheckpointMismatchError(f"data.files: the training text changed since the checkpoint (text_sha256 "
                                          f"{state.get('text_sha256')} there, {self.digest} now)")
        super().load_state_dict(state)


@DATASETS.register("text")
class TextData(_PackedText):
    """The user's UTF-8 text files (one document each); BPE, char or a given tokenizer.json; packed windows."""

    Config = TextConfig  # type: ignore[assignment]
    cfg: TextConfig  # type: ignore[assignment]

    def __init__(self, cfg: TextConfig, **kw: Any):  # noqa: ARG002
        self.cfg = cfg
        train = [read_text_file(f, f"data.files.{i}") for i, f in enumerate(cfg.files)]
        val = [read_text_file(f, f"data.val_files.{i}") for i, f in enumerate(cfg.val_files)]
        tok = load_tokenizer_file(cfg.tokenizer_file) if cfg.tokenizer_file else None
        self.tokenizer, tr, va = self._tokenize(train, val, tok)
        if not cfg.val_files:  # hold out the tail of the stream
            cut = int(len(tr) * (1 - cfg.val_fraction))
            tr, va = tr[:cut], tr[cut:]
        need = cfg.seq_len + 1
        if len(tr) < need or len(va) < need:
            which = "training" if len(tr) < need else "validation"
            raise DataError(f"data.files: the {which} text has {min(len(tr), len(va))} tokens, fewer than one "
                            f"window of data.seq_len + 1 = {need} (give more text or a shorter seq_len)")
        self.train_ids = torch.from_numpy(tr.astype(np.int64))
        self.val_ids = torch.from_numpy(va.astype(np.int64))
        self.digest = hashlib.sha256(tr.astype(np.int64).tobytes()).hexdigest()[:16]

    def _tokenize(self, train: list[str], val: list[str], tok: TextTokenizer | None
                  ) -> tuple[TextTokenizer, np.ndarray, np.ndarray]:
        cfg = self.cfg
        key = hashlib.sha256(json.dumps({
            "v": 1, "tok": cfg.tokenizer if tok is None else tok.to_json(), "V": cfg.vocab_size,
            "train": [hashlib.sha256(t.encode()).hexdigest() for t in train],
            "val": [hashlib.sha256(t.encode()).hexdigest() for t in val]}).encode()).hexdigest()[:16]
        d = cache_root(cfg.cache_dir).parent / "text" / key
        tok_path, tr_path, va_path = d / "tokenizer.json", d / "train.npy", d / "val.npy"
        if tok_path.is_file() and tr_path.is_file() and va_path.is_file():
            return TextTokenizer.load(tok_path), np.load(tr_path), np.load(va_path)
        if tok is None:
            tok = BPETokenizer.train(train, cfg.vocab_size) if cfg.tokenizer == "bpe" else CharTokenizer.train(train)
        tr = _encode(tok, train)
        va = _encode(tok, val) if val else np.zeros(0, dtype=tr.dtype)
        d.mkdir(parents=True, exist_ok=True)
        for path, arr in ((tr_path, tr), (va_path, va)):
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, arr)
            tmp.replace(path)
        _atomic_write(tok_path, tok.to_json().encode())
        return tok, tr, va

    def loader(self, seed: int) -> PackedLoader:
        return TextLoader(self.train_ids, self.cfg.seq_len, seed, self.digest)
