"""AdvMoE (configs/zoo/advmoe_vit_digits.yaml): the L-inf PGD attack stays in its box and in the pixel range and
finds the loss maximum a brute-force search finds; the alternating scheme leaves the frozen group bitwise
unchanged; the short recipe trains through the CLI and ``moesaic eval`` reports robust accuracy."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moesaic.cli import main
from moesaic.core.errors import ConfigError
from moesaic.train.adversarial import batch_attack, pgd_attack, robust_accuracy
from moesaic.train.objectives.advmoe import router_parameters
from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "zoo" / "advmoe_vit_digits.yaml"
SHORT = ["train.batch_size=16", "train.threads=1", "train.progress=false", "train.save_at_end=false",
         "train.eval_at_end=false", "model.num_layers=2"]


def _trainer(tmp_path: Path, *sets: str) -> Trainer:
    return Trainer(load_run_config(RECIPE, [*SHORT, *sets]), tmp_path / "run", log=lambda _m: None)


def _vit_batch(t: Trainer) -> dict[str, torch.Tensor]:
    return t.data.eval_batches(24)[0]


def test_pgd_stays_in_the_box_and_pixel_range_and_raises_the_loss(tmp_path: Path) -> None:
    t = _trainer(tmp_path)
    model, task = t.model.eval(), t.task
    b = _vit_batch(t)
    x = b["pixel_values"]
    assert x.min() >= 0 and x.max() <= 1 and (x == 0).any() and (x == 1).any()  # real digits touch both ends
    eps = 0.1
    adv = batch_attack(model, task, b, "pixel_values", eps, 0.04, 5, 0.0, 1.0)
    xa = adv["pixel_values"]
    assert (xa - x).abs().max() <= eps + 1e-7
    assert xa.min() >= 0 and xa.max() <= 1
    assert not xa.requires_grad and all(p.grad is None for p in model.parameters())  # no parameter gradient

    def loss(xx: torch.Tensor) -> float:
        with torch.no_grad():
            return float(task.loss_sum(task.logits(model, {**b, "pixel_values": xx}), b["labels"])[0])

    clean, attacked = loss(x), loss(xa)
    assert attacked > clean, (clean, attacked)
    # brute force: the best of 256 random corners of the same box (every pixel at x +- eps, clipped), one forward
    g = torch.Generator().manual_seed(0)
    R = 256
    corners = (x + eps * (2 * torch.randint(0, 2, (R, *x.shape), generator=g) - 1)).clamp(0, 1)
    with torch.no_grad():
        logits = model(corners.reshape(-1, 8, 8), task_id=b["task_id"].repeat(R)).logits
    per_corner = F.cross_entropy(logits, b["labels"].repeat(R), reduction="none").reshape(R, -1).sum(1)
    assert per_corner.shape == (R,) and float(per_corner[0]) == pytest.approx(loss(corners[0]), rel=1e-5)
    assert attacked > float(per_corner.max()), (attacked, float(per_corner.max()))


def test_pgd_finds_the_exact_maximum_of_a_linear_classifier() -> None:
    """Cross-entropy of a linear two-class model is a monotone function of a linear margin, so its maximum over
    the box (the L-inf ball cut to [0, 1]) is at a corner: enumerate all 2^8 corners (float64)."""
    torch.manual_seed(1)
    w, bias = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    x = torch.rand(5, 8, dtype=torch.float64)
    x[:, 0], x[:, 1] = 0.0, 1.0  # pixels at the ends of the range: the box is cut there
    y = torch.tensor([0, 1, 0, 1, 1])
    eps = 0.15

    def ce(xx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(xx @ w.T + bias, y, reduction="none")

    xa = pgd_attack(lambda xx: ce(xx).sum(), x, eps, alpha=eps / 4, steps=12)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    corners = torch.tensor(list(itertools.product([0, 1], repeat=8)), dtype=torch.float64)  # [256, 8]
    for i in range(len(x)):
        cand = lo[i] + corners * (hi[i] - lo[i])
        brute = F.cross_entropy(cand @ w.T + bias, y[i].expand(len(cand)), reduction="none").max()
        assert torch.allclose(ce(xa)[i], brute, rtol=0, atol=1e-12), (i, float(ce(xa)[i]), float(brute))
        assert (xa[i] - x[i]).abs().max() <= eps + 1e-12 and xa[i].min() >= 0 and xa[i].max() <= 1


def _snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _same(a: list[torch.Tensor], params: list[torch.nn.Parameter]) -> bool:
    return all(torch.equal(x, p) for x, p in zip(a, params, strict=True))


def test_alternation_freezes_routers_and_experts_exactly(tmp_path: Path) -> None:
    t = _trainer(tmp_path, "train.max_steps=4", "train.weight_decay=0.1")
    routers = router_parameters(t.model)
    ids = {id(p) for p in routers}
    others = [p for p in t.model.parameters() if id(p) not in ids]
    experts = [p for n, p in t.model.named_parameters() if ".experts." in n]
    assert routers and experts
    t.model.train()
    for step in range(4):
        r0, o0 = _snapshot(routers), _snapshot(others)
        t.train_step(t.loader.next_batch(16))
        if step % 2 == 0:  # router step: experts and the rest of the network frozen
            assert _same(o0, others) and not _same(r0, routers), step
        else:  # expert step (with the rest of the network): routers frozen
            assert _same(r0, routers) and not _same(o0, others), step
            assert not _same([o0[i] for i, p in enumerate(others) if any(p is e for e in experts)], experts)


def test_joint_adversarial_training_updates_everything(tmp_path: Path) -> None:
    t = _trainer(tmp_path, "train.objective.alternate=false")
    params = list(t.model.parameters())
    before = _snapshot(params)
    t.model.train()
    t.train_step(t.loader.next_batch(16))
    changed = [not torch.equal(a, p) for a, p in zip(before, params, strict=True)]
    assert all(changed)


def test_alternation_needs_routers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="alternate"):
        _trainer(tmp_path, "model.moe=null")


def test_robust_accuracy_is_repeatable_and_below_clean(tmp_path: Path) -> None:
    t = _trainer(tmp_path)
    batches = t.data.eval_batches(128, task=1)[:1]
    a1 = robust_accuracy(t.model, t.task, batches, 0.1, 3)
    assert a1 == robust_accuracy(t.model, t.task, batches, 0.1, 3)
    assert robust_accuracy(t.model, t.task, batches, 0.0, 1) == pytest.approx(
        float((t.model.eval()(**{k: v for k, v in batches[0].items() if k != "labels"}).logits.argmax(-1)
               == batches[0]["labels"]).float().mean()))


@pytest.mark.slow
def test_short_recipe_trains_and_eval_reports_robust_accuracy(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", str(RECIPE), "--out", str(out), "--set", "train.max_steps=40", "--set",
                 "train.warmup_steps=4", "--set", "train.batch_size=32", "--set", "train.eval_every=40",
                 "--set", "train.log_every=1", "--set", "train.threads=1", "--set", "model.num_layers=2",
                 "--set", "train.objective.steps=2", "--set", "train.objective.eval_steps=3"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.93 * first, (first, last)  # deterministic (seeded, one thread): about 0.89 here
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    line = capsys.readouterr().out
    assert "robust_accuracy" in line and "PGD eps 0.05, 3 steps" in line
    robust = float(line.split("robust_accuracy ")[1].split()[0])
    clean = float(line.split("val_accuracy ")[1].split()[0])
    assert robust <= clean
    assert main(["eval", str(out), "--pgd-eps", "0", "--pgd-steps", "1"]) == 0
    line = capsys.readouterr().out
    assert float(line.split("robust_accuracy ")[1].split()[0]) == pytest.approx(clean)  # eps 0: clean accuracy
    assert main(["eval", str(out), "--pgd-eps", "-1"]) == 2


def test_eps_warmup_ramps_linearly() -> None:
    from moesaic.train.objectives.advmoe import AdvMoEConfig

    cfg = AdvMoEConfig(eps=0.1, eps_warmup_steps=4)
    assert [cfg.ramp(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert AdvMoEConfig(eps=0.1).ramp(0) == 1.0
