"""Gradient accumulation 4 x 2 equals batch 8 (float64; docs/training.md, Trainer): LM loss, aux loss and gradients,
with unequal valid tokens per micro-batch (padding and ignored labels). Definition: moesaic/train/loss.py."""

import copy

import torch

import moesaic
from lm_fixtures import accumulate_grads, padded_lm_batch
from moesaic.train.loss import IGNORE_INDEX, lm_loss_sum
from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer


def _trainer(tiny_data, tmp_path, ga, router, **train):
    d = copy.deepcopy(tiny_data)
    d["model"]["moe"]["router"] = router
    d["model"]["moe"]["shared_experts"] = {"num": 1}
    d["train"].update(batch_size=8, grad_accum=ga, dtype="float64", grad_clip=0.0, **train)
    return Trainer(load_run_config(data=d), tmp_path / f"ga{ga}")


def _batch(vocab):  # micro-batches of 2 rows: 32, 12, 17, 17 tokens
    return padded_lm_batch(vocab, 7, [16, 16, 3, 9, 16, 1, 12, 5], (3, slice(0, 4)))


_grads = accumulate_grads


def test_ga_4x2_equals_batch_8_token_mean_aux(tiny_data, data_cache, tmp_path):
    router = {"kind": "topk", "aux_loss_coef": 0.0, "z_loss_coef": 0.01}  # z-loss: a mean over routed tokens
    t1, t4 = _trainer(tiny_data, tmp_path, 1, router), _trainer(tiny_data, tmp_path, 4, router)
    t4.model.load_state_dict(t1.model.state_dict())
    batch = _batch(t1.data.vocab_size)
    (r1, g1), (r4, g4) = _grads(t1, batch), _grads(t4, batch)
    assert r1["tokens"] == r4["tokens"] == int((batch["labels"] != IGNORE_INDEX).sum())
    assert r4["aux_loss"] > 0
    assert abs(r1["loss"] - r4["loss"]) <= 1e-12
    assert abs(r1["aux_loss"] - r4["aux_loss"]) <= 1e-12
    assert g1.keys() == g4.keys()
    for n in g1:
        torch.testing.assert_close(g4[n], g1[n], atol=1e-12, rtol=0, msg=n)


def test_ga_switch_balance_is_token_weighted_mean_of_micro_batches(tiny_data, data_cache, tmp_path):
    """``train.aux_accumulation: micro_batch``: a batch-statistics balance loss is defined per micro-batch; the
    step weighs it by routed tokens. Checked against a brute-force objective built from separate forwards.
    (The default, ``exact``, is tested in test_accumulation_exact.py.)"""
    router = {"kind": "topk", "aux_loss_coef": 0.05, "z_loss_coef": 0.0}
    t4 = _trainer(tiny_data, tmp_path, 4, router, aux_accumulation="micro_batch")
    batch = _batch(t4.data.vocab_size)
    r4, g4 = _grads(t4, batch)
    N = int((batch["labels"] != IGNORE_INDEX).sum())
    T = int(batch["attention_mask"].sum())
    ce, aux = 0.0, 0.0
    for i in range(0, 8, 2):
        mb = {k: v[i:i + 2] for k, v in batch.items()}
        logits = t4.model(mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        s, _ = lm_loss_sum(logits, mb["labels"])
        a = moesaic.collect_aux_losses(t4.model)
        ce, aux = ce + s / N, aux + a * int(mb["attention_mask"].sum()) / T
    (ce + aux).backward()
    assert abs(float(ce.detach()) - r4["loss"]) <= 1e-12 and abs(float(aux.detach()) - r4["aux_loss"]) <= 1e-12
    for n, p in t4.model.named_parameters():
        torch.testing.assert_close(g4[n], p.grad, atol=1e-12, rtol=0, msg=n)
    # and the LM part alone equals batch 8 regardless of the balance loss
    t1 = _trainer(tiny_data, tmp_path, 1, router, aux_accumulation="micro_batch")
    t1.model.load_state_dict(t4.model.state_dict())
    r1, _ = _grads(t1, batch)
    assert abs(r1["loss"] - r4["loss"]) <= 1e-12
