"""Step-driven routing state survives checkpoint resume exactly (issue 3: schedules are saved and restored with
the training state): SMoE-Dropout's k schedule (a persistent ``step`` buffer) and THOR's random draws (the
trainer's RNG state) give the same losses and weights as an uninterrupted run."""

import copy
import json

import pytest
import torch

from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer

ROUTERS = {
    "smoe_dropout": ({"kind": "smoe_dropout", "k_schedule": {"kind": "linear_increase", "min_value": 1,
                                                               "max_value": 4, "total_steps": 6, "integer": True}},
                     4, None),
    "thor": ({"kind": "thor", "granularity": "token"}, 1, 1.0),
}


def _cfg(tiny_data, name, max_steps):
    router, k, alpha = ROUTERS[name]
    d = copy.deepcopy(tiny_data)
    d["model"]["moe"].update(num_experts=4, top_k=k, router=router)
    d["train"].update(max_steps=max_steps, save_every=3, eval_at_end=False, batch_size=4, grad_accum=1,
                      log_every=1)
    if alpha is not None:
        d["train"]["objective"] = {"kind": "thor", "alpha": alpha}
    return load_run_config(data=d)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.mark.parametrize("name", list(ROUTERS))
def test_resume_is_exact(tiny_data, data_cache, tmp_path, name):
    full = Trainer(_cfg(tiny_data, name, 6), tmp_path / "full")
    assert full.run() == 0
    assert Trainer(_cfg(tiny_data, name, 3), tmp_path / "split").run() == 0
    resumed = Trainer(_cfg(tiny_data, name, 6), tmp_path / "split", resume=True)
    assert resumed.step == 3
    if name == "smoe_dropout":
        assert resumed.model.model.layers[0].mlp.router.current_k == 3  # round(3 * 3 / 6) + 1 = 2 + 1, restored
    assert resumed.run() == 0
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
