"""Trainer details: schedule, metrics fields, routing stats, bf16 autocast, all-padding batches, vocab check."""

import copy
import json
import math

import pytest
import torch

from moesaic.core.errors import ConfigError
from moesaic.train.config import TrainConfig
from moesaic.train.lr_schedule import lr_factor
from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer


def _cfg(tiny_data, **train):
    d = copy.deepcopy(tiny_data)
    d["train"].update(train)
    return load_run_config(data=d)


def test_warmup_cosine_schedule():
    c = TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(10, c) == pytest.approx(1.0)
    assert lr_factor(60, c) == pytest.approx(0.55)
    assert lr_factor(110, c) == pytest.approx(0.1)
    assert [lr_factor(s, c) for s in range(10, 110)] == sorted([lr_factor(s, c) for s in range(10, 110)], reverse=True)


def test_metrics_and_routing_stats(tiny_data, data_cache, tmp_path):
    t = Trainer(_cfg(tiny_data, max_steps=4, log_every=2, eval_every=4, save_every=100, tensorboard=True), tmp_path)
    assert t.run() == 0
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 4]
    last = recs[-1]
    for k in ("loss", "aux_loss", "lr", "tokens_per_s", "val_loss", "val_ppl", "routing"):
        assert k in last, k
    assert math.isclose(last["val_ppl"], math.exp(last["val_loss"]), rel_tol=1e-9)
    r = last["routing"]["model.layers.0.mlp"]
    # 2 micro-batches x 2 rows x 16 tokens x top-2 = 128 assignments over 4 experts
    assert r["mean_load"] == 32.0 and r["max_load"] >= 32 and r["dropped"] == 0
    assert 0 < r["entropy"] <= math.log(4) + 1e-6
    assert sum(r["load"]) == 128 and len(r["load"]) == 4 and max(r["load"]) == r["max_load"]
    mean = sum(r["load"]) / 4
    assert math.isclose(r["cv"], math.sqrt(sum((x - mean) ** 2 for x in r["load"]) / 4) / mean, rel_tol=1e-9)
    assert r["aux_balance"] > 0  # the weighted balance loss of this layer, averaged over micro-batches
    assert (tmp_path / "tensorboard").is_dir()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0})
    ea.Reload()
    assert "routing/model.layers.0.mlp/load" in ea.Tags()["histograms"]
    assert "routing/model.layers.0.mlp/aux_balance" in ea.Tags()["scalars"]
    assert (tmp_path / "LATEST").read_text().strip() == "step-00000004"  # save_at_end


def test_bf16_autocast_trains_finite(tiny_data, data_cache, tmp_path):
    t = Trainer(_cfg(tiny_data, max_steps=3, autocast="bf16", save_at_end=False, eval_at_end=True), tmp_path)
    assert t.run() == 0
    assert math.isfinite(t.summary["loss"]) and math.isfinite(t.summary["val_loss"])
    assert abs(t.summary["val_loss"] - math.log(t.data.vocab_size)) < 1.0  # near chance after 3 steps


def test_all_padding_batch_is_skipped(tiny_data, data_cache, tmp_path):
    t = Trainer(_cfg(tiny_data, max_steps=3), tmp_path)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    ids = torch.zeros(4, 16, dtype=torch.long)
    r = t.train_step({"input_ids": ids, "attention_mask": torch.zeros_like(ids),
                      "labels": torch.full_like(ids, -100)})
    assert r["loss"] == 0.0 and r["tokens"] == 0 and t.step == 1
    assert all(torch.equal(before[n], p) for n, p in t.model.named_parameters())


def test_vocab_too_small_rejected(tiny_data, data_cache, tmp_path):
    d = copy.deepcopy(tiny_data)
    d["model"]["vocab_size"] = 5
    with pytest.raises(ConfigError, match="model.vocab_size"):
        Trainer(load_run_config(data=d), tmp_path)
