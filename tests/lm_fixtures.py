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


def padded_lm_batch(vocab: int, seed: int, lengths: list[int], ignored: tuple[int, slice]) -> dict:
    """8 x 16 random LM batch: row i has ``lengths[i]`` real tokens (attention_mask), labels are the next
    token (-100 on padding and the last position) and ``ignored`` = (row, columns) is also -100 inside real
    text, so micro-batches have unequal valid-token counts."""
    import torch

    from moesaic.train.loss import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (len(lengths), 16), generator=g)
    mask = (torch.arange(16)[None] < torch.tensor(lengths)[:, None]).long()
    labels = torch.roll(ids, -1, 1).masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, -1] = IGNORE_INDEX
    labels[ignored[0], ignored[1]] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def accumulate_grads(trainer, batch: dict) -> tuple[dict, dict]:
    """One ``Trainer.accumulate`` on ``batch``: its result and a copy of every gradient (then zeroed)."""
    r = trainer.accumulate(batch)
    g = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.opt.zero_grad(set_to_none=True)
    return r, g
