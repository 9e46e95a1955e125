"""A config whose model cannot fit is refused before allocation (moesaic.train.memory_check): the meta-device
count equals the real model's, and a 10^11-parameter MoE is refused by `moesaic train` with one line."""

import copy

import yaml

from moesaic.cli import main as cli_main
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
