"""The training objective hook (moesaic.train.objectives): the registry, the default task objective, a plugin
objective that holds a frozen teacher (distillation next wave) and typed errors for a wrong kind or task."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import moesaic
from moesaic.core.errors import ConfigError
from moesaic.train.loss import IGNORE_INDEX, lm_loss_sum
from moesaic.train.objectives import LossPieces, Objective, ObjectiveConfig
from moesaic.train.objectives.base import OBJECTIVES
from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer


@dataclasses.dataclass
class TeacherConfig(ObjectiveConfig):
    beta: float = 0.5


@OBJECTIVES.register("test_teacher")
class TeacherObjective(Objective):
    """Task loss + beta * summed KL(teacher || student) over labelled positions, against a frozen teacher."""

    Config = TeacherConfig

    def setup(self, model, task):
        super().setup(model, task)
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)  # a module, not a model parameter
        with torch.no_grad():
            for p in self.teacher.parameters():
                p.mul_(0.5)

    def __call__(self, model, batch, task, ctx):
        with ctx.autocast():
            logits = task.logits(model, batch)
        aux = ctx.aux(model)
        with torch.no_grad():
            t_logits = task.logits(self.teacher, batch)
        ce_sum, _ = task.loss_sum(logits, batch["labels"])
        keep = batch["labels"] != IGNORE_INDEX
        kl = F.kl_div(logits[keep].log_softmax(-1), t_logits[keep].log_softmax(-1), log_target=True,
                      reduction="sum")
        return LossPieces(ce_sum + self.cfg.beta * kl, ce_sum, aux)


def _trainer(tiny_data, path, objective, **train):
    d = copy.deepcopy(tiny_data)
    d["train"].update(batch_size=4, grad_accum=2, dtype="float64", grad_clip=0.0, objective=objective, **train)
    return Trainer(load_run_config(data=d), path)


def _batch(vocab):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(vocab, (4, 16), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def test_registry_names_the_objectives():
    assert {"task", "thor", "test_teacher"} <= set(OBJECTIVES.names())
    assert OBJECTIVES.describe("thor").startswith("THOR")


def test_frozen_teacher_objective_step_equals_brute_force(tiny_data, data_cache, tmp_path):
    t = _trainer(tiny_data, tmp_path / "kd", {"kind": "test_teacher", "beta": 0.5})
    teacher = t.objective.teacher
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    model_ids = {id(p) for p in t.model.parameters()}
    opt_ids = {id(p) for g in t.opt.param_groups for p in g["params"]}
    assert not {id(p) for p in teacher.parameters()} & (model_ids | opt_ids)
    batch = _batch(t.data.vocab_size)
    r = t.accumulate(batch)
    got = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    t.opt.zero_grad(set_to_none=True)

    # brute force: the whole batch at once (exact aux accumulation: the aux loss of the whole batch)
    logits = t.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["labels"] != IGNORE_INDEX
    with torch.no_grad():
        t_logits = teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce, n = lm_loss_sum(logits, batch["labels"])
    kl = F.kl_div(logits[keep].log_softmax(-1), t_logits[keep].log_softmax(-1), log_target=True, reduction="sum")
    ((ce + 0.5 * kl) / n + moesaic.collect_aux_losses(t.model)).backward()
    assert abs(r["loss"] - float(ce.detach()) / n) <= 1e-12
    assert float(kl.detach()) > 1e-3
    for name, p in t.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, atol=1e-12, rtol=0, msg=name)
    assert all(p.grad is None for p in teacher.parameters())
    t.train_step(batch)
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())  # frozen
    path = t.save()
    from safetensors.torch import load_file

    assert set(load_file(str(path / "model.safetensors"))) == set(t.model.state_dict())  # no teacher tensors


def test_unknown_objective_kind_is_a_config_error(tiny_data, data_cache, tmp_path):
    with pytest.raises(ConfigError) as e:
        _trainer(tiny_data, tmp_path / "bad", {"kind": "thorr"})
    assert e.value.path == "train.objective.kind" and "thor" in str(e.value)


def test_thor_objective_needs_its_settings_typed(tiny_data, data_cache, tmp_path):
    with pytest.raises(ConfigError) as e:
        _trainer(tiny_data, tmp_path / "bad", {"kind": "thor", "alpha": -1.0})
    assert e.value.path == "train.objective.alpha"
