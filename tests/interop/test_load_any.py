"""``moesaic.load`` opens a moesaic checkpoint or a Hugging Face folder (interop/load.py)."""

from __future__ import annotations

import pytest
import torch

import moesaic
from moesaic.core.errors import CheckpointError, ConversionError
from moesaic.interop.hf import from_hf
from moesaic.interop.load import is_hf_folder
from moesaic.train.tokenizer import BPETokenizer

from .conftest import build_hf


def test_hf_folder_loads_with_its_tokenizer(tmp_path) -> None:
    build_hf("mixtral", tmp_path)
    BPETokenizer.train(["to be or not to be, that is the question"] * 4, vocab_size=270).save(
        tmp_path / "tokenizer.json")
    assert is_hf_folder(tmp_path)
    model = moesaic.load(tmp_path)
    ref = from_hf(tmp_path)
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    assert torch.equal(model(ids).logits, ref(ids).logits)
    assert model.tokenizer is not None and model.tokenizer.decode(model.tokenizer.encode("to be")) == "to be"
    assert not model.training


def test_hf_folder_without_tokenizer_and_bad_paths(tmp_path) -> None:
    build_hf("mixtral", tmp_path / "hf")
    assert moesaic.load(tmp_path / "hf").tokenizer is None
    with pytest.raises(CheckpointError, match="Hugging Face folder not found"):
        moesaic.load(tmp_path / "missing")
    (tmp_path / "hf" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConversionError, match="unreadable tokenizer"):
        moesaic.load(tmp_path / "hf")
