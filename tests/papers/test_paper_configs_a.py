"""The recipes in configs/papers/ of the routing designs (top-p, THOR, SMoE-Dropout, hash layers, task routing,
Soft MoE) load, validate and train."""

from pathlib import Path

import pytest

from moesaic.examples import paper_toys
from moesaic.train.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["top_p", "smoe_dropout", "thor", "hash", "soft_moe", "m3vit_task_gates", "domain_routing"]


@pytest.mark.parametrize("name", CONFIGS)
def test_recipe_checks_and_trains_two_steps(name, capsys):
    path = str(ROOT / "configs" / "papers" / f"{name}.yaml")
    cfg = load_run_config(path)
    assert cfg.model.moe.router.kind in name or name.startswith(("m3vit", "domain"))
    assert paper_toys.main([path, "--set", "train.max_steps=2", "--no-baseline"]) == 0
    out = capsys.readouterr().out
    assert ("mse" in out) or ("acc" in out)


@pytest.mark.parametrize("name", ["thor_lm", "hash_lm", "top_p_lm", "smoe_dropout_lm", "topk_lm_baseline"])
def test_lm_recipes_validate(name):
    cfg = load_run_config(str(ROOT / "configs" / "papers" / f"{name}.yaml"))
    assert cfg.model.kind == "decoder_lm" and cfg.data.kind == "shakespeare"
    if name == "thor_lm":
        assert cfg.train.objective.kind == "thor" and cfg.train.objective.alpha == 5.0
        assert cfg.model.moe.router.kind == "thor"
