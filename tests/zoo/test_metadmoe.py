"""Meta-DMoE (configs/zoo/metadmoe_*.yaml), short version: two genre teachers trained by `moesaic train`, a student
distilled from both through the documented command sequence (teacher paths relative to the working folder),
its loss falls, and `moesaic eval` scores it on the in-domain plays and on the held-out genre."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moesaic.cli import main

ZOO = Path(__file__).resolve().parents[2] / "configs" / "zoo"
OOD = "data.val_plays=[hamlet, lear, macbeth, othello]"
TINY = ["model.d_model=32", "model.num_layers=1", "model.d_ff=64", "model.max_seq_len=32", "data.tokenizer=char",
        "data.seq_len=32", "data.eval_windows=8", "train.batch_size=8", "train.threads=1", "train.warmup_steps=2",
        "train.log_every=1", "train.progress=false"]


def _sets(*extra: str) -> list[str]:
    return [a for s in (*TINY, *extra) for a in ("--set", s)]


def _val_loss(out: str) -> float:
    return float(out.split("val_loss ")[1].split()[0])


@pytest.mark.slow
def test_short_recipe_sequence_trains_and_evaluates(tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for dom in ("comedy", "history"):
        assert main(["train", str(ZOO / f"metadmoe_teacher_{dom}.yaml"), "--out", f"runs/metadmoe-{dom}",
                     *_sets("train.max_steps=12", "train.eval_every=12")]) == 0
    assert main(["train", str(ZOO / "metadmoe_student.yaml"), "--out", "runs/metadmoe-student",
                 *_sets("train.max_steps=30", "train.eval_every=30")]) == 0
    recs = [json.loads(x) for x in Path("runs/metadmoe-student/metrics.jsonl").read_text().splitlines()]
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    cfg = Path("runs/metadmoe-student/config.yaml").read_text()
    assert "runs/metadmoe-comedy" in cfg and "aggregation: posterior" in cfg
    capsys.readouterr()
    assert main(["eval", "runs/metadmoe-student"]) == 0
    in_domain = _val_loss(capsys.readouterr().out)
    assert main(["eval", "runs/metadmoe-student", "--set", OOD]) == 0
    held_out = _val_loss(capsys.readouterr().out)
    assert in_domain > 0 and held_out > 0 and in_domain != held_out
