"""A tokenizer without the document separator (an imported one) has ``eos_id = None``; data streams that
need the separator refuse it with a typed error instead of failing inside numpy."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from moesaic.core.errors import ConfigError
from moesaic.train.datasets.shakespeare import _encode
from moesaic.train.tokenizer import BPETokenizer, CharTokenizer, TextTokenizer


def _no_eos_bpe() -> BPETokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["to be or not to be"], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    return BPETokenizer(tok)


def test_trained_tokenizers_have_the_separator() -> None:
    bpe = BPETokenizer.train(["to be or not to be"], vocab_size=300)
    assert bpe.eos_id is not None and bpe.require_eos() == bpe.eos_id
    reloaded = TextTokenizer.from_json(bpe.to_json())
    assert reloaded.require_eos() == bpe.eos_id
    assert CharTokenizer("abc").require_eos() == 3


def test_a_tokenizer_without_the_separator_is_refused_by_name() -> None:
    tok = _no_eos_bpe()
    assert tok.eos_id is None
    with pytest.raises(ConfigError, match=r"data\.tokenizer = 'bpe': has no <\|eos\|> token"):
        tok.require_eos()
    with pytest.raises(ConfigError, match="eos"):
        _encode(tok, ["to be"])
