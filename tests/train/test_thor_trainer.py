"""THOR in the trainer (Zuo et al. 2022): ``train.objective: {kind: thor, alpha}`` runs two stochastic passes
per micro-batch with the objective CE1 + CE2 + alpha * CR (moesaic.train.objectives.thor)."""

import copy

import torch

from moesaic.train.loss import IGNORE_INDEX
from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer


def _trainer(tiny_data, tmp_path, name, E, alpha):
    d = copy.deepcopy(tiny_data)
    d["model"]["moe"].update(num_experts=E, top_k=1, router={"kind": "thor"})
    d["train"].update(batch_size=4, grad_accum=2, dtype="float64", grad_clip=0.0)
    if alpha is not None:
        d["train"]["objective"] = {"kind": "thor", "alpha": alpha}
    return Trainer(load_run_config(data=d), tmp_path / name)


def _batch(vocab):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(vocab, (4, 16), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _grads(t, batch):
    r = t.accumulate(batch)
    g = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    t.opt.zero_grad(set_to_none=True)
    return r, g


def test_one_expert_thor_step_is_twice_the_dense_objective(tiny_data, data_cache, tmp_path):
    plain = _trainer(tiny_data, tmp_path, "plain", 1, None)
    thor = _trainer(tiny_data, tmp_path, "thor", 1, 5.0)
    thor.model.load_state_dict(plain.model.state_dict())
    batch = _batch(plain.data.vocab_size)
    (r1, g1), (r2, g2) = _grads(plain, batch), _grads(thor, batch)
    assert abs(r1["loss"] - r2["loss"]) <= 1e-12  # the logged loss is the mean of the two passes' CE
    for n in g1:  # CR = 0 with one expert and no dropout: the gradient is exactly twice the CE gradient
        torch.testing.assert_close(g2[n], 2 * g1[n], atol=1e-12, rtol=0, msg=n)


def test_two_experts_step_objective(tiny_data, data_cache, tmp_path):
    from moesaic.train.objectives.thor import thor_lm_step

    t = _trainer(tiny_data, tmp_path, "thor2", 2, 1.0)
    batch = _batch(t.data.vocab_size)
    torch.manual_seed(0)
    outs = [thor_lm_step(t.model, batch, 1.0) for _ in range(8)]
    assert any(o.cr > 0 for o in outs) and all(o.cr >= 0 for o in outs)  # the two passes drew differently
    for o in outs:
        torch.testing.assert_close(o.loss, o.ce1 + o.ce2 + o.cr + o.aux, atol=1e-12, rtol=0)
    out = t.train_step(batch)
    assert out["tokens"] == 4 * 15 and out["loss"] > 0
