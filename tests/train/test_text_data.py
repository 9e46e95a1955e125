"""`data.kind: text`: a user's text file trains; every unusable file is a typed DataError before the first
step with no --out folder left behind; resuming on another tokenizer or edited text is a mismatch."""

import copy
import os
from pathlib import Path

import pytest
import yaml

from moesaic.cli import main
from moesaic.core.errors import CheckpointMismatchError, ConfigError, DataError
from moesaic.train import checkpoint as ckpt
from moesaic.train import faults, text_files
from moesaic.train.datasets.shakespeare import play_files
from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer


@pytest.fixture(scope="module")
def play() -> str:
    return play_files()["macbeth"].read_text(encoding="utf-8")


def _cfg(tiny_data: dict, *files: Path, **data: object) -> dict:
    d = copy.deepcopy(tiny_data)
    d["data"] = {"kind": "text", "files": [str(f) for f in files], "tokenizer": "char", "seq_len": 16,
                 "eval_windows": 4, **data}
    d["train"].update(max_steps=2, save_every=2, eval_every=2)
    return d


def _train(cfg: dict, out: Path, resume: bool = False) -> Trainer:
    t = Trainer(load_run_config(data=copy.deepcopy(cfg)), out, resume=resume)
    assert t.run() == 0
    return t


def test_a_text_file_trains_and_the_checkpoint_has_its_tokenizer(tiny_data, data_cache, tmp_path, play):
    import moesaic

    f = tmp_path / "macbeth.txt"
    f.write_text(play, encoding="utf-8")
    _train(_cfg(tiny_data, f), tmp_path / "run")
    m = moesaic.load(tmp_path / "run" / "step-00000002")
    assert m.tokenizer.decode(m.tokenizer.encode("Macbeth")) == "Macbeth"
    assert set(m.tokenizer.chars) == set(play)


@pytest.mark.parametrize("content,rule", [
    (b"", "is empty"), (b"  \n\t\n", "only whitespace"), (bytes(range(256)) * 64, "NUL bytes"),
    ("na\u00efve caf\u00e9\n".encode("latin-1") * 50, "not UTF-8"), (None, "no such file"), ("dir", "not a regular")])
def test_unusable_files_are_data_errors_and_leave_no_folder(tiny_data, data_cache, tmp_path, capsys, content, rule):
    f = tmp_path / "data.txt"
    if content == "dir":
        f.mkdir()
    elif content is not None:
        f.write_bytes(content)
    with pytest.raises(DataError, match=rule):
        Trainer(load_run_config(data=_cfg(tiny_data, f)), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a failed start removes the folder it created
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tiny_data, f)))
    assert main(["train", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.files.0 = ") and str(f) in err[0] and rule in err[0]
    assert not (tmp_path / "out").exists()


def test_a_failed_start_keeps_a_folder_it_did_not_create(tiny_data, data_cache, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError):
        Trainer(load_run_config(data=_cfg(tiny_data, tmp_path / "missing.txt")), tmp_path / "out")
    assert (tmp_path / "out").is_dir()


@pytest.mark.parametrize("what", ["vanish", "rewrite", "append"])
def test_a_file_that_changes_while_it_is_read(tiny_data, data_cache, tmp_path, play, monkeypatch, what):
    f = tmp_path / "t.txt"
    f.write_text(play, encoding="utf-8")
    monkeypatch.setattr(text_files, "CHUNK", 4096)
    seen = []

    def change(offset: int) -> None:
        if seen:
            return
        seen.append(offset)
        if what == "vanish":
            os.unlink(f)
        elif what == "rewrite":
            f.write_text("short\n")
        else:
            with open(f, "a") as h:
                h.write("more\n")

    with faults.installed("data.read", change), pytest.raises(DataError, match="while being read"):
        Trainer(load_run_config(data=_cfg(tiny_data, f)), tmp_path / "out")
    assert seen == [4096] and not (tmp_path / "out").exists()


def test_tokenizer_files_that_do_not_fit(tiny_data, data_cache, tmp_path, play):
    f = tmp_path / "t.txt"
    f.write_text(play, encoding="utf-8")
    bad = tmp_path / "bad.json"
    bad.write_text('{"vocab": [1, 2')
    with pytest.raises(DataError, match="data.tokenizer_file .*not a tokenizer.json"):
        Trainer(load_run_config(data=_cfg(tiny_data, f, tokenizer_file=str(bad))), tmp_path / "o1")
    _train(_cfg(tiny_data, f), tmp_path / "ref")
    tok = tmp_path / "tokenizer.json"
    tok.write_bytes((tmp_path / "ref" / "step-00000002" / "tokenizer.json").read_bytes())
    small = _cfg(tiny_data, f, tokenizer_file=str(tok))
    small["model"]["vocab_size"] = 10
    with pytest.raises(ConfigError, match="model.vocab_size"):
        Trainer(load_run_config(data=small), tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # the same path, another tokenizer: resuming is refused, the checkpoint stays
    cfg = _cfg(tiny_data, f, tokenizer_file=str(tok))
    _train(cfg, tmp_path / "run")
    other = tmp_path / "other.txt"
    other.write_text(play.upper() + "~{}", encoding="utf-8")
    _train(_cfg(tiny_data, other), tmp_path / "other")
    tok.write_bytes((tmp_path / "other" / "step-00000002" / "tokenizer.json").read_bytes())
    cfg["train"]["max_steps"] = 4
    with pytest.raises(CheckpointMismatchError, match="tokenizer"):
        Trainer(load_run_config(data=cfg), tmp_path / "run", resume=True)
    assert ckpt.latest_valid(tmp_path / "run").name == "step-00000002"


def test_resume_after_the_text_was_edited_is_a_mismatch(tiny_data, data_cache, tmp_path, play):
    f = tmp_path / "t.txt"
    f.write_text(play, encoding="utf-8")
    cfg = _cfg(tiny_data, f)
    _train(cfg, tmp_path / "run")
    cfg["train"]["max_steps"] = 4
    f.write_text(play.replace("Macbeth", "Macbeht"), encoding="utf-8")  # same characters: same tokenizer
    with pytest.raises(CheckpointMismatchError, match="text_sha256"):
        Trainer(load_run_config(data=cfg), tmp_path / "run", resume=True)
    f.write_text(play, encoding="utf-8")
    _train(cfg, tmp_path / "run", resume=True)  # the original text resumes


def test_too_little_text_and_config_rules(tiny_data, data_cache, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("To be, or not to be.\n")
    with pytest.raises(DataError, match="fewer than one window"):
        Trainer(load_run_config(data=_cfg(tiny_data, f)), tmp_path / "out")
    with pytest.raises(ConfigError, match="data.files"):
        load_run_config(data=_cfg(tiny_data))
    with pytest.raises(ConfigError, match="data.val_fraction"):
        load_run_config(data=_cfg(tiny_data, f, val_fraction=1.0))
