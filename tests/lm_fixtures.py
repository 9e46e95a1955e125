"""Tiny Shakespeare runs for the trainer and CLI tests: char tokens, two short plays, a 2-layer MoE LM."""

import copy
import os
from pathlib import Path

import pytest
import yaml

TINY = {
    "model": {"kind": "decoder_lm", "d_model": 16, "num_layers": 2, "d_ff": 32, "max_seq_len": 32,
              "attention": {"num_heads": 2},
              "moe": {"d_ff": 32, "num_experts": 4, "top_k": 2, "router": {"kind": "topk", "aux_loss_coef": 0.01}}},
    "data": {"kind": "shakespeare", "tokenizer": "char", "seq_len": 16, "train_plays": ["macbeth"],
             "val_plays": ["tempest"], "eval_windows": 4},
    "train": {"max_steps": 40, "batch_size": 4, "grad_accum": 2, "lr": 0.003, "warmup_steps": 3, "log_every": 1,
              "eval_every": 20, "save_every": 5, "keep_last": 3, "tensorboard": False, "progress": False,
              "threads": 1},
}


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("moesaic-cache")
    os.environ["MOESAIC_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def tiny_data() -> dict:
    return copy.deepcopy(TINY)


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory, data_cache) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p
