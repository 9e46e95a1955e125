"""``moesaic train CONFIG --init-from CKPT_OR_HF``: a dense Shakespeare run upcycled by ``moesaic convert`` and
trained on from its weights (the upcycled checkpoint computes the dense logits), and a model that does not fit the
config is one typed error line."""

from __future__ import annotations

import copy
import json

import torch
import yaml

import moesaic
from moesaic.cli import main
from moesaic.moe.layer import MoELayer


def test_upcycled_checkpoint_trains_on_from_the_dense_weights(tmp_path, tiny_data, data_cache, capsys) -> None:
    data = copy.deepcopy(tiny_data)
    data["model"]["moe"] = None
    data["train"].update(max_steps=4, eval_every=4, save_every=4, dtype="float64")
    cfg = tmp_path / "dense.yaml"
    cfg.write_text(yaml.safe_dump(data))
    assert main(["train", str(cfg), "--out", str(tmp_path / "dense")]) == 0
    assert main(["convert", "upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"),
                 "--set", "num_experts=4"]) == 0
    moe_cfg = tmp_path / "moe" / "step-00000000" / "config.yaml"
    capsys.readouterr()
    assert main(["train", str(moe_cfg), "--init-from", str(tmp_path / "moe"), "--out", str(tmp_path / "cont"),
                 "--set", "train.max_steps=1", "--set", "train.eval_every=1", "--set", "train.save_every=1"]) == 0
    cont = moesaic.load(tmp_path / "cont")
    assert sum(isinstance(m, MoELayer) for m in cont.modules()) == 2
    # the step-0 model of the continued run is the dense one: same validation loss on the same windows
    dense, up = moesaic.load(tmp_path / "dense"), moesaic.load(tmp_path / "moe")
    ids = torch.randint(0, int(dense.cfg.vocab_size), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(up(ids).logits, dense(ids).logits, atol=1e-10, rtol=0)
    rows = [json.loads(x) for x in (tmp_path / "cont" / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] == 1


def test_init_from_a_model_that_does_not_fit_is_one_error(tmp_path, tiny_config, capsys) -> None:
    data = yaml.safe_load(tiny_config.read_text())
    data["model"]["moe"] = None
    data["train"].update(max_steps=1, eval_every=1, save_every=1)
    dense_cfg = tmp_path / "dense.yaml"
    dense_cfg.write_text(yaml.safe_dump(data))
    assert main(["train", str(dense_cfg), "--out", str(tmp_path / "dense")]) == 0
    capsys.readouterr()
    assert main(["train", str(tiny_config), "--init-from", str(tmp_path / "dense"), "--out",
                 str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --init-from") and "do not match" in err[-1], err
    assert main(["train", str(tiny_config), "--init-from", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "bad2")]) == 2
    assert "not found" in capsys.readouterr().err
