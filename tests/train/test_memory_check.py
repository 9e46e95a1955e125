"""A config whose model cannot fit is refused before allocation (moesaic.train.memory_check): the meta-device
count equals the real model's, and a 10^11-parameter MoE is refused by `moesaic train` with one line."""

import copy

import pytest
import torch
import yaml

from moesaic.cli import main as cli_main
from moesaic.core.errors import ConfigError
from moesaic.models.masks import sliding_window_mask
from moesaic.train.memory_check import STATE_COPIES, available_bytes, count_parameters
from moesaic.train.run_config import load_run_config


def test_meta_count_equals_the_built_model(tiny_data):
    d = copy.deepcopy(tiny_data)
    d["model"]["vocab_size"] = 70
    cfg = load_run_config(data=d)
    m = cfg.model.build()
    assert count_parameters(cfg.model) == sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
    assert available_bytes() > 0 and STATE_COPIES == 4


def test_a_model_too_big_for_memory_is_refused_before_allocation(tiny_data, data_cache, tmp_path, capsys):
    d = copy.deepcopy(tiny_data)
    d["model"].update(d_model=16384, d_ff=65536)
    d["model"]["moe"].update(d_ff=65536, num_experts=64)
    cfg = tmp_path / "huge.yaml"
    cfg.write_text(yaml.safe_dump(d))
    assert cli_main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model: needs about ") and "GiB is available" in err[0], err
    assert not list((tmp_path / "run").glob("step-*"))


@pytest.mark.parametrize("field,value", [("vocab_size", 10**40), ("d_model", 10**100),
                                         ("attention.sliding_window", 10**200)])
def test_a_size_beyond_any_tensor_is_a_config_error(tiny_data, data_cache, tmp_path, capsys, field, value):
    """Found by the config fuzzer (make chaos): such ints reached torch.empty (TypeError traceback) or the
    sliding-window mask (OverflowError traceback)."""
    d = copy.deepcopy(tiny_data)
    node = d["model"]
    *parents, last = field.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(d))
    assert cli_main(["train", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: model.{field}: an integer of ") and "tensor size" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_float_field_given_an_int_beyond_float64_is_a_config_error(tiny_data):
    d = copy.deepcopy(tiny_data)
    d["train"]["lr"] = 10**400
    with pytest.raises(ConfigError, match=r"train.lr: an integer of 1329 bits is too large for a number"):
        load_run_config(data=d)


def test_a_window_past_the_keys_is_no_window():
    causal = sliding_window_mask(None, 5, 7, 7 + 1, True, torch.device("cpu"))
    for w in (8, 10**6, 2**70):
        assert torch.equal(sliding_window_mask(None, 5, 7, w, True, torch.device("cpu")), causal)
    assert bool(causal[0, 0, -1].all())
