"""`moesaic train/eval/generate`: a happy path, and bad input -> one line `error: ...`, exit 2."""

import copy

import pytest
import yaml

from moesaic.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_config):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", str(tiny_config), "--out", str(out), "--set", "train.max_steps=3",
                 "--set", "train.save_every=2"]) == 0
    return out


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def test_train_eval_generate(trained, capsys):
    assert (trained / "LATEST").read_text().strip() == "step-00000003"
    assert sorted(p.name for p in trained.glob("step-*")) == ["step-00000002", "step-00000003"]
    assert main(["eval", str(trained)]) == 0
    assert "val_loss" in capsys.readouterr().out
    assert main(["generate", str(trained / "step-00000002"), "--prompt", "KING", "--max-new-tokens", "5",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("KING")
    main(["generate", str(trained), "--prompt", "KING", "--max-new-tokens", "5", "--seed", "1"])
    b = capsys.readouterr().out
    main(["generate", str(trained), "--prompt", "KING", "--max-new-tokens", "5", "--seed", "1"])
    assert b == capsys.readouterr().out  # seeded sampling is reproducible


@pytest.mark.parametrize("override,needle", [
    ("train.max_stepz=3", "did you mean 'max_steps'"),
    ("train.max_steps=abc", "must be an integer"),
    ("train.grad_accum=3", "must divide batch_size"),
    ("model.attention.num_heads=3", "num_heads"),
    ("data.val_plays=[nonesuch]", "unknown play"),
])
def test_train_bad_config(tiny_config, tmp_path, capsys, override, needle):
    assert main(["train", str(tiny_config), "--out", str(tmp_path / "o"), "--set", override]) == 2
    line = _err(capsys)
    assert needle in line


def test_train_unwritable_out_and_existing_run(tiny_config, trained, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["train", str(tiny_config), "--out", str(f / "sub")]) == 2
    assert "not writable" in _err(capsys)
    assert main(["train", str(tiny_config), "--out", str(trained)]) == 2
    assert "--resume" in _err(capsys)


def test_resume_with_changed_config_rejected(tiny_config, trained, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    assert main(["train", str(tiny_config), "--out", str(out), "--resume", "--set", "train.lr=0.1"]) == 2
    assert "train.lr" in _err(capsys)


def test_generate_and_eval_bad_input(trained, tmp_path, capsys):
    assert main(["generate", str(trained), "--prompt", "x" * 40]) == 2
    assert "longer than the model's context" in _err(capsys)
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "not found" in _err(capsys)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "pytorch_model.bin").write_bytes(b"junk")
    assert main(["eval", str(foreign)]) == 2
    assert "manifest" in _err(capsys)
    assert main(["generate", str(trained), "--prompt", "hi", "--top-p", "0"]) == 2
    assert "top_p" in _err(capsys)


def test_config_file_errors(tmp_path, capsys, tiny_data):
    bad = copy.deepcopy(tiny_data)
    bad["model"]["moe"]["top_k"] = 9
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    assert main(["train", str(p), "--out", str(tmp_path / "o")]) == 2
    assert "top_k" in _err(capsys)
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in _err(capsys)
