"""A router from one file outside the package (one_file_router.py) whose balance loss is declared only as a
statistic gets exact gradient accumulation through the public training step: grad_accum 4 x 2 equals batch
8 in float64 (loss, aux loss and every gradient within 1e-12), while each micro-batch's own loss does not."""

from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path

from lm_fixtures import accumulate_grads, padded_lm_batch
from moesaic.moe.routing.base import ROUTERS
from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer

ROUTER = {"kind": "tempered", "temperature": 0.7, "aux_loss_coef": 0.5}


def _trainer(tiny_data: dict, path: object, grad_accum: int, **train: object) -> Trainer:
    d = copy.deepcopy(tiny_data)
    d["model"]["moe"].update(router=dict(ROUTER), top_k=2)
    d["train"].update(batch_size=8, grad_accum=grad_accum, dtype="float64", grad_clip=0.0, **train)
    return Trainer(load_run_config(data=d), path)


def _max_diff(g1: dict, g2: dict) -> float:
    assert g1.keys() == g2.keys()
    return max(float((g1[n] - g2[n]).abs().max()) for n in g1)


def test_one_file_router_accumulates_exactly(tiny_data, data_cache, tmp_path, monkeypatch, request):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # the user's module on their path
    request.addfinalizer(lambda: (sys.modules.pop("one_file_router", None), ROUTERS.remove("tempered")))
    importlib.import_module("one_file_router")  # registers the router
    t1 = _trainer(tiny_data, tmp_path / "ga1", 1)
    t4 = _trainer(tiny_data, tmp_path / "ga4", 4)
    tm = _trainer(tiny_data, tmp_path / "mb", 4, aux_accumulation="micro_batch")
    t4.model.load_state_dict(t1.model.state_dict())
    tm.model.load_state_dict(t1.model.state_dict())
    batch = padded_lm_batch(t1.data.vocab_size, 11, [16, 2, 16, 16, 7, 1, 10, 13], (2, slice(3, 9)))
    (r1, g1), (r4, g4), (rm, gm) = (accumulate_grads(t, batch) for t in (t1, t4, tm))
    assert r4["aux_loss"] > 0.5  # E * sum P^2 >= 1, coefficient 0.5, two layers
    assert abs(r1["loss"] - r4["loss"]) <= 1e-12
    assert abs(r1["aux_loss"] - r4["aux_loss"]) <= 1e-12
    assert _max_diff(g1, g4) <= 1e-12
    router_grads = [g4[n] for n in g4 if "router" in n]
    assert router_grads and max(float(g.abs().max()) for g in router_grads) > 1e-6
    # negative control: each micro-batch's own statistics give another aux loss and gradient
    assert abs(r1["aux_loss"] - rm["aux_loss"]) > 1e-6 and _max_diff(g1, gm) > 1e-8
