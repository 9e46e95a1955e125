"""Corruption fuzz (docs/training.md, Checkpoints): 500 random mutations of a checkpoint are all detected: a typed
error on explicit load, and auto-resume falls back to the previous valid checkpoint."""

import random
import shutil

import pytest
import torch

from moesaic.core.errors import CheckpointCorruptError, CheckpointError, CheckpointMismatchError
from moesaic.train import checkpoint as ckpt
from moesaic.train.run_config import load_run_config
from moesaic.train.tokenizer import CharTokenizer

MODEL = {"kind": "decoder_lm", "vocab_size": 12, "d_model": 8, "num_layers": 1, "d_ff": 8,
         "attention": {"num_heads": 2}, "moe": {"d_ff": 8, "num_experts": 2, "top_k": 1,
                                                              "router": {"normalization": "none"}}}


def _save(out, step, model, cfg_yaml):
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(12, (1, 4))).logits.sum().backward()
    opt.step()
    return ckpt.save_checkpoint(out, step, config_yaml=cfg_yaml, model_state=ckpt.gather_model_state(model),
                                optimizer_state=opt.state_dict(), trainer_state={"step": step, "data": {}},
                                rng_state={"torch_cpu": torch.get_rng_state()},
                                tokenizer_json=CharTokenizer("abcdefghijk").to_json())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from moesaic.core.config import dump_yaml

    cfg = load_run_config(data={"model": MODEL})
    out = tmp_path_factory.mktemp("run")
    model = cfg.model.build()
    _save(out, 1, model, dump_yaml(cfg))
    _save(out, 2, model, dump_yaml(cfg))
    return out


def _mutate(d, other, rng):
    files = sorted(p for p in d.iterdir() if p.is_file())
    kind = rng.choice(["truncate", "flip", "delete", "manifest", "swap", "swap_other", "append"])
    p = rng.choice(files)
    data = p.read_bytes()
    if kind == "truncate":
        p.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "flip":
        i = rng.randrange(len(data))
        p.write_bytes(data[:i] + bytes([data[i] ^ rng.randrange(1, 256)]) + data[i + 1:])
    elif kind == "append":
        p.write_bytes(data + bytes([rng.randrange(256)]))
    elif kind == "delete":
        p.unlink()
    elif kind == "manifest":
        m = d / "manifest.json"
        raw = m.read_bytes()
        choice = rng.randrange(4)
        if choice == 0:
            m.unlink()
        elif choice == 1:  # garble a span
            i = rng.randrange(len(raw))
            m.write_bytes(raw[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + raw[i + 8:])
        elif choice == 2:  # a plausible edit: a different step or expert count
            m.write_bytes(raw.replace(b'"step":2', b'"step":3').replace(b'"num_tensors":', b'"num_tensors":1'))
        else:
            m.write_bytes(raw.replace(b'"complete":true', b'"complete":false'))
    elif kind == "swap":
        q = rng.choice([f for f in files if f.read_bytes() != data])
        a, b = p.read_bytes(), q.read_bytes()
        p.write_bytes(b)
        q.write_bytes(a)
    else:  # the same file from the previous checkpoint (a mix-up of two saves); only files that differ
        p = rng.choice([f for f in files if (other / f.name).read_bytes() != f.read_bytes()])
        p.write_bytes((other / p.name).read_bytes())
    return kind


def test_500_random_corruptions_all_detected(run_dir, tmp_path):
    rng = random.Random(1234)
    good = run_dir / ckpt.step_dir_name(2)
    prev = run_dir / ckpt.step_dir_name(1)
    kinds: dict[str, int] = {}
    out = tmp_path / "run"
    shutil.copytree(prev, out / prev.name)
    for _trial in range(500):
        d = out / good.name
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(good, d)
        kind = _mutate(d, prev, rng)
        kinds[kind] = kinds.get(kind, 0) + 1
        with pytest.raises((CheckpointCorruptError, CheckpointMismatchError)):
            ckpt.load_files(d, training=True)
        warned = []
        assert ckpt.latest_valid(out, warn=warned.append) == out / prev.name
        assert warned and "step-00000002" in warned[0]
    assert min(kinds.values()) >= 30, kinds  # every mutation kind exercised
    # the untouched previous checkpoint still loads completely
    files = ckpt.load_files(out / prev.name, training=True)
    assert files["step"] == 1


def test_explicit_load_errors_are_typed(run_dir, tmp_path):
    import moesaic

    with pytest.raises(CheckpointError, match="not found"):
        moesaic.load(tmp_path / "missing")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "model.bin").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointCorruptError, match="no manifest"):
        moesaic.load(tmp_path / "foreign")
    model = moesaic.load(run_dir)  # the run dir resolves through LATEST
    assert model.cfg.num_layers == 1 and not model.training


def test_mismatched_model_rejected(run_dir):
    files = ckpt.load_files(run_dir)
    bigger = load_run_config(data={"model": dict(MODEL, moe={"d_ff": 8, "num_experts": 4, "top_k": 1})}).model.build()
    with pytest.raises(CheckpointMismatchError, match="shape"):
        ckpt.load_model_state(bigger, files["model_state"], "ckpt")
    dense = load_run_config(data={"model": dict(MODEL, moe=None)}).model.build()
    with pytest.raises(CheckpointMismatchError, match="missing|unexpected"):
        ckpt.load_model_state(dense, files["model_state"], "ckpt")


def test_keep_last_never_deletes_newest_valid(tmp_path):
    from moesaic.core.config import dump_yaml

    cfg = load_run_config(data={"model": MODEL})
    model = cfg.model.build()
    for s in range(1, 6):
        p = _save(tmp_path, s, model, dump_yaml(cfg))
        ckpt.prune(tmp_path, 2, p)
        steps = [x for x, _ in ckpt.list_steps(tmp_path)]
        assert steps == list(range(s, max(0, s - 2), -1))
    (tmp_path / ".step-00000006.tmp").mkdir()  # a crashed save
    assert ckpt.latest_valid(tmp_path) == tmp_path / "step-00000005"
    ckpt.prune(tmp_path, 1, tmp_path / "step-00000005")
    assert [x for x, _ in ckpt.list_steps(tmp_path)] == [5] and not list(tmp_path.glob(".step-*"))
