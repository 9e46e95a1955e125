"""Genre classification of Shakespeare passages (``data: {kind: shakespeare_genre}``): is a window of
``seq_len`` tokens from a comedy, a history or a tragedy? Plays and tokenizer as in
:mod:`moesaic.train.datasets.shakespeare` (the same reading, BPE/char tokenizer and cache).

Labels follow the First Folio (Mr. William Shakespeares Comedies, Histories, & Tragedies, London 1623),
whose catalogue sorts the plays into these three sections (:data:`FOLIO_GENRE`). Two plays need a word:
*Troilus and Cressida* is missing from the catalogue but printed, as "The Tragedie of Troylus and Cressida",
between the histories and the tragedies, so it counts as a tragedy; *Pericles* is not in the First Folio
(it entered the second issue of the Third Folio, 1664, unsectioned) and is counted as a comedy, with the
other late romances (The Tempest, The Winter's Tale) that the Folio lists as comedies.

Split by play, stratified: validation holds ``val_per_class`` whole plays of every genre (drawn with
``random.Random(split_seed)``) or the listed ``val_plays``, so validation accuracy is measured on unseen
plays (no character names or plots shared with training). Every genre must appear in both splits.
Examples are non-overlapping windows of each play's token stream, skipping the first window (the title,
e.g. "THE TRAGEDY OF ..."), optionally capped to ``windows_per_play`` evenly spaced ones; validation takes
``eval_windows_per_play`` evenly spaced windows per play, so every validation play weighs the same.
Training batches are class-balanced by oversampling (:mod:`moesaic.train.example_loader`).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from moesaic.core.config import require, rule
from moesaic.core.errors import ConfigError
from moesaic.train.datasets.base import DATASETS, Dataset
from moesaic.train.datasets.shakespeare import PlayTextConfig, play_files, tokenize_plays
from moesaic.train.example_loader import ExampleLoader

GENRES = ("comedy", "history", "tragedy")

#: Play (``shksprdata/texts/NAME_gut.txt``) -> First Folio section (1623 catalogue; see the module docstring).
FOLIO_GENRE = {
    # Comedies, in Folio order
    "tempest": "comedy", "two_gentlemen_of_verona": "comedy", "merry_wives_of_windsor": "comedy",
    "measure_for_measure": "comedy", "comedy_of_errors": "comedy", "much_ado_about_nothing": "comedy",
    "loves_labours_lost": "comedy", "midsummer_nights_dream": "comedy", "merchant_of_venice": "comedy",
    "as_you_like_it": "comedy", "taming_of_the_shrew": "comedy", "alls_well_that_ends_well": "comedy",
    "twelfth_night": "comedy", "winters_tale": "comedy",
    "pericles": "comedy",  # not in the First Folio (Third Folio, 1664); grouped with the late romances
    # Histories
    "john": "history", "richard_ii": "history", "henry_iv_part_1": "history", "henry_iv_part_2": "history",
    "henry_v": "history", "henry_vi_part_1": "history", "henry_vi_part_2": "history",
    "henry_vi_part_3": "history", "richard_iii": "history", "henry_viii": "history",
    # Tragedies
    "troilus_and_cressida": "tragedy",  # printed before Coriolanus, not in the catalogue
    "coriolanus": "tragedy", "tragedy_of_titus_andronicus": "tragedy", "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy", "julius_caesar": "tragedy", "macbeth": "tragedy", "hamlet": "tragedy",
    "lear": "tragedy", "othello": "tragedy", "antony_and_cleopatra": "tragedy", "cymbeline": "tragedy",
}


def plays_by_genre() -> dict[str, list[str]]:
    """Genre -> sorted plays, for every play of the installed texts (each must have a Folio genre)."""
    out: dict[str, list[str]] = {g: [] for g in GENRES}
    for p in play_files():
        require(p in FOLIO_GENRE, "data.kind", "shakespeare_genre", f"play {p!r} has no genre in FOLIO_GENRE")
        out[FOLIO_GENRE[p]].append(p)
    return out


@dataclasses.dataclass
class ShakespeareGenreConfig(PlayTextConfig):
    seq_len: int = rule(64, ge=1, doc="tokens per example window")
    val_plays: list[str] | None = None  # None: val_per_class plays per genre drawn with split_seed
    val_per_class: int = rule(2, ge=1)
    split_seed: int = 0
    windows_per_play: int | None = rule(None, ge=1, doc="cap on training windows per play (evenly spaced)")
    balance: Literal["oversample", "none"] = "oversample"
    eval_windows_per_play: int = rule(64, ge=1)

    def validate(self, path: str) -> None:
        by_genre = plays_by_genre()
        if self.val_plays is not None:
            for i, p in enumerate(self.val_plays):
                require(p in FOLIO_GENRE, f"{path}.val_plays.{i}", p, f"unknown play; known: {', '.join(FOLIO_GENRE)}")
        else:
            small = min(len(v) for v in by_genre.values())
            require(self.val_per_class < small, f"{path}.val_per_class", self.val_per_class,
                    f"must leave training plays of every genre (the smallest genre has {small} plays)")
        train, val = split_plays(self)
        for g in GENRES:
            require(any(FOLIO_GENRE[p] == g for p in val), f"{path}.val_plays", self.val_plays,
                    f"must include a {g} (every genre in both splits)")
            require(any(FOLIO_GENRE[p] == g for p in train), f"{path}.val_plays", self.val_plays,
                    f"must leave a {g} for training (every genre in both splits)")


def split_plays(cfg: ShakespeareGenreConfig) -> tuple[list[str], list[str]]:
    """(training plays, validation plays), each in the sorted order of the texts folder."""
    by_genre = plays_by_genre()
    if cfg.val_plays is not None:
        val = set(cfg.val_plays)
    else:
        rng = random.Random(cfg.split_seed)
        val = {p for g in GENRES for p in rng.sample(by_genre[g], cfg.val_per_class)}
    order = list(play_files())
    return [p for p in order if p not in val], [p for p in order if p in val]


def split_streams(ids: np.ndarray, eos_id: int, n: int) -> list[np.ndarray]:
    """The ``n`` per-play streams of a token stream where each play is followed by ``eos_id``."""
    ends = np.flatnonzero(ids == eos_id)
    assert len(ends) == n, f"expected {n} end-of-play ids, found {len(ends)}"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ids[s:e] for s, e in zip(starts, ends)]


def play_windows(stream: np.ndarray, seq_len: int, limit: int | None) -> np.ndarray:
    """Non-overlapping windows ``[n, seq_len]`` after the first (title) window; ``limit`` evenly spaced."""
    n = max(len(stream) // seq_len - 1, 0)
    starts = [(j + 1) * seq_len for j in range(n)]
    if limit is not None and limit < n:
        starts = [starts[(i * n) // limit] for i in range(limit)]
    return np.stack([stream[s: s + seq_len] for s in starts]) if starts else np.zeros((0, seq_len), np.int64)


@DATASETS.register("shakespeare_genre")
class ShakespeareGenre(Dataset):
    """Genre (comedy/history/tragedy, First Folio) of a Shakespeare passage; split by play, stratified."""

    Config = ShakespeareGenreConfig
    cfg: ShakespeareGenreConfig
    label_names = GENRES
    num_labels = len(GENRES)

    def __init__(self, cfg: ShakespeareGenreConfig, **kw: Any):
        self.cfg = cfg
        self.train_plays, self.val_plays = split_plays(cfg)
        self.tokenizer, tr, va, self.cache_dir = tokenize_plays(self.train_plays, self.val_plays, cfg.tokenizer,
                                                                cfg.vocab_size, cfg.cache_dir)
        eos = self.tokenizer.require_eos()
        self.train_x, self.train_y, self.train_play_of = self._examples(
            split_streams(tr, eos, len(self.train_plays)), self.train_plays, cfg.windows_per_play)
        self.val_x, self.val_y, self.val_play_of = self._examples(
            split_streams(va, eos, len(self.val_plays)), self.val_plays, cfg.eval_windows_per_play)
        for split, y in (("training", self.train_y), ("validation", self.val_y)):
            missing = [g for i, g in enumerate(GENRES) if not bool((y == i).any())]
            if missing:
                raise ConfigError("data.seq_len", cfg.seq_len, f"leaves no {split} passage of genre {missing[0]} "
                                  "(each play gives its windows after the first; use shorter windows)")

    def _examples(self, streams: list[np.ndarray], plays: list[str], limit: int | None
                  ) -> tuple[Tensor, Tensor, Tensor]:
        xs, ys, ps = [], [], []
        for i, (s, p) in enumerate(zip(streams, plays)):
            w = play_windows(s, self.cfg.seq_len, limit)
            xs.append(torch.from_numpy(w.astype(np.int64)))
            ys.append(torch.full((len(w),), GENRES.index(FOLIO_GENRE[p]), dtype=torch.long))
            ps.append(torch.full((len(w),), i, dtype=torch.long))
        return torch.cat(xs), torch.cat(ys), torch.cat(ps)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def loader(self, seed: int) -> ExampleLoader:
        return ExampleLoader(self.train_x, self.train_y, seed, self.cfg.balance)

    def eval_batches(self, batch_size: int) -> list[dict[str, Tensor]]:
        return [{"input_ids": self.val_x[i: i + batch_size], "labels": self.val_y[i: i + batch_size]}
                for i in range(0, len(self.val_y), batch_size)]

    def class_counts(self, split: str = "val") -> dict[str, int]:
        y = self.val_y if split == "val" else self.train_y
        return {g: int((y == i).sum()) for i, g in enumerate(GENRES)}

    def majority_baseline(self) -> float:
        """Validation accuracy of the best constant prediction (the most frequent validation genre)."""
        counts = self.class_counts("val")
        return max(counts.values()) / max(sum(counts.values()), 1)
