"""The distill objective (train.objective: {kind: distill}): one step against a float64 brute force (logits KL
with temperature and a hidden-state loss), a frozen eval-mode teacher outside the optimizer and the checkpoint,
a Hugging Face folder as teacher, and typed errors (missing teacher, width mismatch)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import moesaic
from moesaic.core.errors import ConfigError
from moesaic.train.loss import IGNORE_INDEX, lm_loss_sum
from moesaic.train.objectives.distill import MissingTeacherError
from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer


def _trainer(tiny_data, path, objective=None, **model):
    d = copy.deepcopy(tiny_data)
    d["model"].update(model)
    d["train"].update(batch_size=4, grad_accum=1, dtype="float64", grad_clip=0.0, max_steps=2, save_every=2,
                      eval_every=2, **({"objective": objective} if objective else {}))
    return Trainer(load_run_config(data=d), path)


@pytest.fixture(scope="module")
def teacher_dir(tiny_data, data_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "t"
    t = _trainer(tiny_data, out, moe=None)  # a dense teacher
    t.run()
    return out


def _batch(vocab):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(vocab, (4, 16), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("hidden_loss", ["none", "mse", "cosine"])
def test_distill_step_equals_brute_force(tiny_data, data_cache, teacher_dir, tmp_path, hidden_loss):
    obj = {"kind": "distill", "teacher": str(teacher_dir), "alpha": 0.3, "temperature": 2.0,
           "hidden_loss": hidden_loss, "hidden_weight": 0.7}
    t = _trainer(tiny_data, tmp_path / "kd", obj)
    teacher = t.objective.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    opt_ids = {id(p) for g in t.opt.param_groups for p in g["params"]}
    assert not {id(p) for p in teacher.parameters()} & opt_ids
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    batch = _batch(t.data.vocab_size)
    r = t.accumulate(batch)
    got = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    t.opt.zero_grad(set_to_none=True)

    out = t.model(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    with torch.no_grad():
        tout = teacher(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    keep = batch["labels"] != IGNORE_INDEX
    ce, n = lm_loss_sum(out.logits, batch["labels"])
    kl = torch.zeros((), dtype=torch.float64)
    for row in range(4):  # brute force, position by position
        for s in range(16):
            if keep[row, s]:
                p_t = (tout.logits[row, s] / 2.0).softmax(-1)
                kl = kl + (p_t * (p_t.log() - (out.logits[row, s] / 2.0).log_softmax(-1))).sum()
    loss = 0.7 * ce + 0.3 * 4.0 * kl
    hs, ht = out.hidden_states[keep], tout.hidden_states[keep]
    if hidden_loss == "mse":
        loss = loss + 0.7 * (hs - ht).square().mean(-1).sum()
    elif hidden_loss == "cosine":
        loss = loss + 0.7 * (1 - F.cosine_similarity(hs, ht, dim=-1)).sum()
    (loss / n + moesaic.collect_aux_losses(t.model)).backward()
    assert abs(r["loss"] - float(ce.detach()) / n) <= 1e-12  # the logged loss is the task loss
    for name, p in t.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, atol=1e-10, rtol=0, msg=name)
    t.train_step(batch)
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())


def test_distill_trains_and_saves_only_the_student(tiny_data, data_cache, teacher_dir, tmp_path):
    t = _trainer(tiny_data, tmp_path / "kd", {"kind": "distill", "teacher": str(teacher_dir)})
    t.run()
    from safetensors.torch import load_file

    path = sorted((tmp_path / "kd").glob("step-*"))[-1]
    assert set(load_file(str(path / "model.safetensors"))) == set(t.model.state_dict())


def test_missing_teacher_is_a_typed_error(tiny_data, data_cache, tmp_path):
    for teacher in ("", str(tmp_path / "nowhere")):
        with pytest.raises(MissingTeacherError) as e:
            _trainer(tiny_data, tmp_path / "kd", {"kind": "distill", "teacher": teacher})
        assert e.value.path == "train.objective.teacher"
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingTeacherError, match="does not load"):
        _trainer(tiny_data, tmp_path / "kd2", {"kind": "distill", "teacher": str(tmp_path / "empty")})


def test_hidden_loss_needs_one_width(tiny_data, data_cache, teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match="one width"):
        _trainer(tiny_data, tmp_path / "kd", {"kind": "distill", "teacher": str(teacher_dir), "hidden_loss": "mse"},
                 d_model=24, attention={"num_heads": 2})


def test_hugging_face_folder_teacher(tiny_data, data_cache, tmp_path):
    transformers = pytest.importorskip("transformers")
    t0 = _trainer(tiny_data, tmp_path / "probe")
    vocab = t0.data.vocab_size
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    t = _trainer(tiny_data, tmp_path / "kd", {"kind": "distill", "teacher": str(tmp_path / "hf")})
    assert type(t.objective.teacher).__name__ == "DecoderLM"
    batch = _batch(vocab)
    r = t.accumulate(batch)
    assert r["loss"] > 0


def test_teacher_mixture_equals_brute_force():
    """Several teachers (Meta-DMoE): ``mean`` averages the tempered distributions; ``posterior`` weighs teacher d
    at position t by p(d | labels before t) with a uniform prior (float64, position by position)."""
    from moesaic.train.objectives.distill import teacher_log_mixture

    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(2, 5, 7, generator=g, dtype=torch.float64) * 2 for _ in range(3)]
    labels = torch.randint(7, (2, 5), generator=g)
    labels[1, 1] = IGNORE_INDEX
    T = 1.7
    mean = teacher_log_mixture(zs, labels, T, "mean").exp()
    post = teacher_log_mixture(zs, labels, T, "posterior").exp()
    for b in range(2):
        for t in range(5):
            p_d = [(z[b, t] / T).softmax(-1) for z in zs]
            torch.testing.assert_close(mean[b, t], sum(p_d) / 3, atol=1e-12, rtol=0)
            lik = torch.tensor([float(torch.prod(torch.stack(
                [z[b, s].softmax(-1)[labels[b, s]] for s in range(t) if labels[b, s] != IGNORE_INDEX]
                or [torch.ones((), dtype=torch.float64)]))) for z in zs], dtype=torch.float64)
            w = lik / lik.sum()
            torch.testing.assert_close(post[b, t], sum(w[d] * p_d[d] for d in range(3)), atol=1e-12, rtol=0)
    assert torch.equal(teacher_log_mixture(zs[:1], labels, T, "posterior"), (zs[0] / T).log_softmax(-1))


def test_several_teachers_distill_and_check(tiny_data, data_cache, teacher_dir, tmp_path):
    obj = {"kind": "distill", "teachers": [str(teacher_dir), str(teacher_dir)], "aggregation": "posterior",
           "alpha": 0.3, "temperature": 2.0}
    t = _trainer(tiny_data, tmp_path / "kd", obj)
    assert len(t.objective.teachers) == 2
    batch = _batch(t.data.vocab_size)
    r = t.accumulate(batch)
    got = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    t.opt.zero_grad(set_to_none=True)
    one = _trainer(tiny_data, tmp_path / "kd1", {**obj, "teachers": [], "teacher": str(teacher_dir)})
    one.model.load_state_dict(t.model.state_dict())
    r1 = one.accumulate(batch)  # two copies of one teacher mix to that teacher, whatever the weights
    assert r["loss"] == r1["loss"]
    for n, p in one.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-12, rtol=0, msg=n)
    with pytest.raises(ConfigError, match="not both"):
        _trainer(tiny_data, tmp_path / "kd2", {**obj, "teacher": str(teacher_dir)})
    with pytest.raises(MissingTeacherError) as e:
        _trainer(tiny_data, tmp_path / "kd3", {**obj, "teachers": [str(teacher_dir), str(tmp_path / "nowhere")]})
    assert e.value.path == "train.objective.teachers.1"
