"""``moesaic train`` with ``model.peft``: only adapters and routers train, the base weights are bitwise those
of the initial model after training, and the checkpoint reloads with its adapters."""

import copy

import torch
import yaml

import moesaic
from lm_fixtures import TINY
from moesaic.cli import main
from moesaic.core.config import parse
from moesaic.models.base import MODELS
from moesaic.peft import lora_modules


def test_train_cli_with_lora_experts(tmp_path, data_cache):
    cfg = copy.deepcopy(TINY)
    cfg["model"]["peft"] = {"kind": "lora_experts", "target_modules": ["q_proj", "v_proj", "w_up_EHD"],
                            "num_experts": 2, "top_k": 1, "shared": True,
                            "router": {"kind": "topk", "normalization": "none", "aux_loss_coef": 0.01}}
    cfg["train"].update(max_steps=4, save_every=4, eval_every=4, grad_accum=1, seed=3)
    path = tmp_path / "peft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out)]) == 0
    trained = moesaic.load(out)
    model_cfg = parse(MODELS.config_of("decoder_lm"), {**cfg["model"], "vocab_size": trained.cfg.vocab_size}, "m")
    torch.manual_seed(3)
    initial = dict(model_cfg.build().named_parameters())
    changed = []
    for n, p in trained.named_parameters():
        if p.requires_grad:
            changed.append(not torch.equal(p, initial[n]))
        else:
            assert torch.equal(p, initial[n]), n  # frozen base: bitwise unchanged
    assert any(changed)
    assert len(lora_modules(trained)) == 2 * 3
