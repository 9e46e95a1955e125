"""A tiny trained Shakespeare MoE checkpoint and tiny Hugging Face folders (with a tokenizer) to analyze."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from moesaic.cli import main
from moesaic.train.tokenizer import BPETokenizer

TEXT = ["To be, or not to be, that is the question.", "Now is the winter of our discontent.",
        "All the world's a stage, and all the men and women merely players."]


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path) -> Path:
    out = tmp_path_factory.mktemp("analysis-run")
    assert main(["train", str(tiny_config), "--out", str(out), "--set", "train.max_steps=4",
                 "--set", "train.save_every=4"]) == 0
    return out


def hf_folder(folder: Path, kind: str, seed: int) -> Path:
    """A random tiny Mixtral (``kind="mixtral"``) or Llama folder with a byte-level BPE tokenizer."""
    torch.manual_seed(seed)
    common = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    cfg = (transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2) if kind == "mixtral"
           else transformers.LlamaConfig(**common))
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(folder))
    BPETokenizer.train(TEXT * 8, vocab_size=300).save(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="session")
def hf_mixtral(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two Mixtral folders with different weights (for --compare)."""
    return (hf_folder(tmp_path_factory.mktemp("mixtral-a"), "mixtral", 0),
            hf_folder(tmp_path_factory.mktemp("mixtral-b"), "mixtral", 1))
