"""DiT-MoE on digits (configs/zoo/dit_moe_digits.yaml): the noising loader against the DDPM formula, resume
determinism, the seeded sampler, the short recipe through the CLI, and the schedule check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moesaic.cli import main
from moesaic.models.dit import alphas_bar, sample
from moesaic.train.datasets.digits import DigitsDiffusion, DigitsDiffusionConfig
from moesaic.train.run_config import load_run_config

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "zoo" / "dit_moe_digits.yaml"


def test_noised_batches_follow_ddpm_and_resume_exactly() -> None:
    data = DigitsDiffusion(DigitsDiffusionConfig(class_dropout=0.0))
    ld = data.loader(3)
    ld.next_batch(8)
    state = ld.state_dict()
    b = ld.next_batch(16)
    abar = alphas_bar(200, 1e-4, 0.02).float()
    # recover x0 from the noised image and its noise: x_t = sqrt(a) x0 + sqrt(1 - a) eps
    a = abar[b["timestep"]][:, None, None]
    x0 = (b["noisy"] - (1 - a).sqrt() * b["labels"]) / a.sqrt()
    assert float(x0.min()) >= -1.0001 and float(x0.max()) <= 1.0001
    assert bool((b["class_labels"] < 10).all())
    again = data.loader(3)
    again.load_state_dict(state)
    b2 = again.next_batch(16)
    assert all(torch.equal(b[k], b2[k]) for k in b)


def test_sampler_is_seeded_and_finite() -> None:
    cfg = load_run_config(RECIPE, ["model.diffusion_steps=5", "data.diffusion_steps=5"]).model
    torch.manual_seed(0)
    model = cfg.build()
    labels = torch.tensor([0, 7, 3])
    a = sample(model, labels, guidance=1.0, generator=torch.Generator().manual_seed(1))
    b = sample(model, labels, guidance=1.0, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 8, 8) and torch.isfinite(a).all() and torch.equal(a, b)


def test_recipe_trains_and_checks_the_schedule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", str(RECIPE), "--out", str(out), "--set", "train.max_steps=40", "--set", "train.batch_size=32",
                 "--set", "train.warmup_steps=4", "--set", "train.eval_every=40", "--set", "train.log_every=1",
                 "--set", "train.threads=1"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert "noise MSE" in capsys.readouterr().out
    assert main(["train", str(RECIPE), "--out", str(tmp_path / "bad"), "--set", "data.diffusion_steps=100"]) == 2
    assert "data.diffusion_steps" in capsys.readouterr().err
