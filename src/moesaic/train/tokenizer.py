"""Tokenizers for the LM data: byte-level BPE (Hugging Face ``tokenizers``; Sennrich et al. 2016, GPT-2's
byte-level variant) or characters. Both serialise to one JSON file stored with the data cache and with
every checkpoint, so ``moesaic generate`` decodes with exactly the tokenizer the model was trained with."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from moesaic.core.errors import ConfigError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOS = "<|eos|>"


class TextTokenizer:
    """``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``eos_id``.

    ``eos_id`` is None only for a tokenizer imported from elsewhere (a Hugging Face ``tokenizer.json``)
    that lacks ``<|eos|>``; the ones moesaic trains always have it."""

    kind = ""
    vocab_size: int
    eos_id: int | None

    def require_eos(self, path: str = "data.tokenizer") -> int:
        """The document separator's id, for data streams that need one."""
        if self.eos_id is None:
            raise ConfigError(path, self.kind, f"has no {EOS} token to separate documents")
        return self.eos_id

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @staticmethod
    def from_json(text: str) -> TextTokenizer:
        data = json.loads(text)
        if isinstance(data, dict) and data.get("moesaic_tokenizer") == "char":
            return CharTokenizer(data["chars"])
        return BPETokenizer.from_str(text)

    @staticmethod
    def load(path: str | Path) -> TextTokenizer:
        return TextTokenizer.from_json(Path(path).read_text(encoding="utf-8"))


class CharTokenizer(TextTokenizer):
    """One id per character seen in training text, plus the end-of-text id (last); unknown characters map
    to the id of ``?`` (or 0)."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}
        self.eos_id = len(chars)
        self.vocab_size = len(chars) + 1
        self.unk = self.index.get("?", 0)

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls("".join(sorted(seen)))

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, self.unk) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] if 0 <= i < len(self.chars) else "" for i in ids)

    def to_json(self) -> str:
        return json.dumps({"moesaic_tokenizer": "char", "chars": self.chars})


class BPETokenizer(TextTokenizer):
    """Byte-level BPE: any text encodes (no unknown tokens); ``<|eos|>`` separates documents."""

    kind = "bpe"

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = tok.token_to_id(EOS)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(list(texts), trainer)
        return cls(tok)

    @classmethod
    def from_str(cls, text: str) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.tok.to_str()
