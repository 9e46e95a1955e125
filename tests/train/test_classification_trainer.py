"""Sequence classification through the trainer and the CLI (train/task.py): a tiny MoE encoder on the
Shakespeare genre data with `moesaic train`, `moesaic eval`, `moesaic.load`; bitwise resume; gradient
accumulation 2 x 2 == batch 4 in float64; mismatched model/data pairs as typed errors."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

import moesaic
from genre_fixtures import tiny_genre
from moesaic.cli import main
from moesaic.core.errors import ConfigError
from moesaic.train.loss import IGNORE_INDEX
from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def genre_config(tmp_path_factory, data_cache):
    p = tmp_path_factory.mktemp("gcfg") / "genre.yaml"
    p.write_text(yaml.safe_dump(tiny_genre()))
    return p


@pytest.fixture(scope="module")
def trained(genre_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("grun")
    assert main(["train", str(genre_config), "--out", str(out)]) == 0
    return out


def test_cli_train_eval_load(trained, capsys):
    recs = _records(trained)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "tokens_per_s"} <= r.keys() for r in recs)
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and "val_ppl" not in r for r in evals)
    # tokens_per_s counts input tokens (4 x 16 per step), not sequences: > 4 sequences per step's time
    assert all(r["tokens_per_s"] > 0 for r in recs)

    capsys.readouterr()
    assert main(["eval", str(trained)]) == 0
    line = capsys.readouterr().out
    assert f"val_accuracy {evals[-1]['val_accuracy']:.4f}" in line and "majority_baseline 0.3333" in line
    assert f"val_loss {evals[-1]['val_loss']:.4f}" in line

    model = moesaic.load(trained)
    assert model.label_names == ("comedy", "history", "tragedy")
    data = model.run_config.data.build()
    # the trainer evaluates in micro-batches of 4 (expert choice routes over a batch): do the same
    correct = sum(int((model(data.val_x[i:i + 4]).logits.argmax(-1) == data.val_y[i:i + 4]).sum())
                  for i in range(0, len(data.val_y), 4))
    assert correct / len(data.val_y) == pytest.approx(evals[-1]["val_accuracy"], abs=1e-12)


def test_generate_on_a_classifier_is_one_error_line(trained, capsys):
    capsys.readouterr()
    assert main(["generate", str(trained), "--prompt", "KING"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "classifier" in err[0]


def test_resume_is_bitwise(trained, genre_config, tmp_path, capsys):
    """3 steps, a new process-equivalent Trainer with --resume, 3 more: identical to 6 straight steps."""
    straight = {r["step"]: (r["loss"], r.get("val_accuracy")) for r in _records(trained)}
    assert main(["train", str(genre_config), "--out", str(tmp_path), "--set", "train.max_steps=3"]) == 0
    assert main(["train", str(genre_config), "--out", str(tmp_path), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    resumed = {r["step"]: (r["loss"], r.get("val_accuracy")) for r in _records(tmp_path)}
    assert resumed == straight


def _ga_trainer(tmp_path, ga):
    d = tiny_genre(train={"batch_size": 4, "grad_accum": ga, "dtype": "float64", "grad_clip": 0.0})
    d["model"]["moe"]["router"] = {"kind": "topk", "aux_loss_coef": 0.0, "z_loss_coef": 0.01}  # token-mean aux
    return Trainer(load_run_config(data=d), tmp_path / f"ga{ga}")


def test_ga_2x2_equals_batch_4_float64(tmp_path, data_cache):
    t1, t2 = _ga_trainer(tmp_path, 1), _ga_trainer(tmp_path, 2)
    t2.model.load_state_dict(t1.model.state_dict())
    batch = t1.loader.next_batch(4)
    batch["labels"][1] = IGNORE_INDEX  # micro-batches with 1 and 2 valid sequences
    grads = []
    for t in (t1, t2):
        r = t.accumulate(batch)
        assert r["tokens"] == 3
        grads.append((r, {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}))
        t.opt.zero_grad(set_to_none=True)
    (r1, g1), (r2, g2) = grads
    assert r2["aux_loss"] > 0
    assert abs(r1["loss"] - r2["loss"]) <= 1e-12 and abs(r1["aux_loss"] - r2["aux_loss"]) <= 1e-12
    logits = t1.model(batch["input_ids"]).logits  # brute force: mean CE over the valid sequences
    ce = F.cross_entropy(logits.detach(), batch["labels"], ignore_index=IGNORE_INDEX)
    assert abs(float(ce) - r1["loss"]) <= 1e-12
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-12, rtol=0, msg=n)


@pytest.mark.parametrize("edit,path", [
    (lambda d: d["model"].update(num_labels=2), "model.num_labels"),
    (lambda d: d.update(data={"kind": "shakespeare", "tokenizer": "char", "seq_len": 16,
                              "train_plays": ["macbeth"], "val_plays": ["tempest"]}), "data.kind"),
    (lambda d: d["model"].update(kind="decoder_lm", moe=None, num_labels=None), "model.kind"),
    (lambda d: d["train"].update(objective={"kind": "thor", "alpha": 1.0}), "train.objective.kind"),
])
def test_mismatched_model_and_data_are_typed_errors(edit, path, tmp_path, data_cache, capsys):
    d = tiny_genre()
    edit(d)
    if d["model"].get("num_labels", 0) is None:
        del d["model"]["num_labels"]
    with pytest.raises(ConfigError) as e:
        Trainer(load_run_config(data=d), tmp_path / "t")
    assert e.value.path == path
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(d))
    assert main(["train", str(cfg), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {path} = ")


def test_encoder_genre_config_dense_twin_has_equal_active_params():
    import dataclasses
    from pathlib import Path

    from moesaic.examples.demo import count_params, dense_twin

    cfg = load_run_config(Path(__file__).resolve().parents[2] / "configs" / "encoder_genre.yaml")
    assert cfg.model.kind == "encoder_classifier" and cfg.model.moe.router.kind == "expert_choice"
    twin = dense_twin(cfg)
    assert twin.model.moe is None and twin.model.d_ff == 128
    moe = dataclasses.replace(cfg.model, vocab_size=1024).build()
    dense = dataclasses.replace(twin.model, vocab_size=1024).build()
    # expert choice with capacity factor 2 runs 2 experts per token on average (= top_k 2 of the twin rule)
    assert count_params(moe)[1] == count_params(dense)[0]


def test_demo_trains_classifier_and_dense_twin(genre_config, tmp_path, capsys):
    from moesaic.examples.demo import main as demo

    assert demo([str(genre_config), "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "majority baseline 0.3333" in out and "val_acc" in out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(("moe ", "dense "))]
    assert [r[0] for r in rows] == ["moe", "dense"] and all(0.0 <= float(r[4]) <= 1.0 for r in rows)


@pytest.mark.slow
def test_kill9_inside_a_save_then_resume_is_bitwise(trained, genre_config, tmp_path):
    """A real process killed (SIGKILL) right after publishing the step-3 checkpoint, then `--resume`: the
    losses and accuracies of steps 1..6 equal the straight run's (fault point of moesaic.train.faults)."""
    import signal

    from train.test_resume import _train

    r = _train(genre_config, tmp_path, kill_at=("checkpoint.after_publish", 3))
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = _train(genre_config, tmp_path, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "at step 3" in r.stderr
    straight = {r["step"]: (r["loss"], r.get("val_accuracy")) for r in _records(trained)}
    assert {r["step"]: (r["loss"], r.get("val_accuracy")) for r in _records(tmp_path)} == straight
