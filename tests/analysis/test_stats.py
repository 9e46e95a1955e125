"""stats.json equals brute-force counts over the routing decisions of a small recorded run."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import moesaic
from moesaic.analysis.run import analyze
from moesaic.analysis.sample import Passage, load_passages
from moesaic.analysis.stats import trace_stats
from moesaic.analysis.trace import DECODE, record
from moesaic.moe.layer import MoELayer


def _decisions(model):
    """Every forward's (token_idx_N, expert_idx_N, num_tokens), per layer, captured independently."""
    got = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, MoELayer):
            got[name] = []
            handles.append(m.register_routing_hook(lambda _l, d, _p, n=name: got[n].append(
                (d.token_idx_N.tolist(), d.expert_idx_N.tolist(), d.num_tokens))))
    return got, handles


def test_stats_equal_brute_force_counts(trained_ckpt: Path, tiny_config: Path) -> None:
    model = moesaic.load(trained_ckpt)
    passages = load_passages(tiny_config, 12)
    assert len({p.meta["play"] for p in passages}) == 12  # one speech per play in turn
    got, handles = _decisions(model)
    trace = record(model, passages, batch_size=5, decode_prompts=2, decode_tokens=3)
    for h in handles:
        h.remove()
    stats = trace_stats(trace)
    lengths = [len(model.tokenizer.encode(p.text)[:32]) for p in passages]
    names = list(got)
    per_layer_sets = {}
    for name in names:
        E = model.get_submodule(name).num_experts
        sets: list[set[int]] = []
        # scoring forwards: batches of 5, right-padded: real rows are b * M + j for j < length
        for f, (tok, exp, T) in enumerate(got[name]):
            if f < 3:
                chunk = lengths[5 * f:5 * f + 5]
                M = max(chunk)
                real = [b * M + j for b, n in enumerate(chunk) for j in range(n)]
            else:
                real = list(range(T))
            rows: dict[int, set[int]] = {r: set() for r in real}
            for t, e in zip(tok, exp):
                if t in rows:
                    rows[t].add(e)
            sets += [rows[r] for r in real]
        per_layer_sets[name] = sets
        s = stats["layers"][name]
        assert s["tokens"] == len(sets) == trace.token_ids.size
        load = [sum(e in x for x in sets) for e in range(E)]
        assert s["load"] == load
        co = [[sum(i in x and j in x for x in sets) for j in range(E)] for i in range(E)]
        assert s["coactivation"] == co
        assert s["max_over_mean"] == pytest.approx(max(load) / np.mean(load))
        decode_rows = [x for x, ph in zip(sets, trace.phase) if ph == DECODE]
        assert s["load_by_phase"]["decode"] == [sum(e in x for x in decode_rows) for e in range(E)]
        genre = trace.meta["genre"]
        for g_i, g in enumerate(s["specialisation"]["genre"]["labels"]):
            mine = [x for x, lab in zip(sets, genre) if lab == g]
            total = sum(len(x) for x in mine)
            assert s["specialisation"]["genre"]["p_expert_given_label"][g_i] == pytest.approx(
                [sum(e in x for x in mine) / total for e in range(E)])
    assert (trace.phase == DECODE).sum() == 2 * 2  # 3 new tokens: the last 2 are read by decode steps
    for a, b in itertools.pairwise(names):
        E = model.get_submodule(a).num_experts
        N = np.zeros((E, E))
        for xa, xb in zip(per_layer_sets[a], per_layer_sets[b]):
            for i in xa:
                for j in xb:
                    N[i, j] += 1 / (len(xa) * len(xb))
        aff = next(x for x in stats["affinity"] if x["from"] == a)
        assert np.allclose(aff["counts"], N)


def test_report_folder_and_stats_json(trained_ckpt: Path, tmp_path: Path) -> None:
    text = tmp_path / "sample.txt"
    text.write_text("Friends, Romans, countrymen, lend me your ears.\n\nI come to bury Caesar, not to praise him.\n")
    out = analyze(moesaic.load(trained_ckpt), text, tmp_path / "rep", timing=False, passages=8)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["source"]["data"] == str(text)
    assert sum(stats["layers"][n]["tokens"] for n in stats["layers"]) > 0
    assert {p.name for p in out.glob("*.png")} >= {"expert_load_per_layer.png", "co-activation.png"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_unit_statistics() -> None:
    from moesaic.analysis.stats import imbalance, mutual_information

    c = np.array([3, 1, 0, 0])
    im = imbalance(c)
    assert im["max_over_mean"] == 3.0 and im["cv"] == pytest.approx(np.std(c) / 1.0)
    p = np.array([0.75, 0.25])
    assert im["entropy"] == pytest.approx(-(p * np.log(p)).sum())
    ids = np.array([[0], [0], [1], [1]])
    names, cond, mi = mutual_information(np.array(["a", "a", "b", "b"], dtype=object), ids, 2)
    assert names == ["a", "b"] and mi == pytest.approx(1.0) and cond.tolist() == [[1, 0], [0, 1]]
    _, _, mi0 = mutual_information(np.array(["a", "b", "a", "b"], dtype=object), ids, 2)
    assert mi0 == pytest.approx(0.0)
    assert Passage("x", {}).meta == {}


def test_prune_list_saliency(trained_ckpt: Path, tiny_config: Path) -> None:
    from moesaic.analysis.actions import prune_list, saliency
    from moesaic.transforms.expert_select import expert_forward

    model = moesaic.load(trained_ckpt)
    trace = record(model, load_passages(tiny_config, 8), decode_prompts=0)
    sal, why = saliency(model, trace)
    assert why == "" and set(sal) == {lt.name for lt in trace.layers}
    # brute force for the first layer: every recorded token, every expert it went to, weight * ||expert(x)||
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, MoELayer))
    xs: list = []
    h = layer.register_forward_pre_hook(lambda _m, a: xs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    got: list = []
    r = layer.register_routing_hook(lambda _l, d, _p: got.append(d))
    with torch.no_grad():
        for ids, mask in trace.batches:
            model(ids, attention_mask=mask)
    h.remove()
    r.remove()
    want = [0.0] * layer.num_experts
    for x, d in zip(xs, got):
        for t, e, w in zip(d.token_idx_N.tolist(), d.expert_idx_N.tolist(), d.weight_N.tolist()):
            y = expert_forward(layer.experts, e, x[t:t + 1].double().float())
            want[e] += abs(w) * float(y.double().norm())
    assert sal[name] == pytest.approx(want, rel=1e-5)
    stats = trace_stats(trace)
    p = prune_list(stats["layers"], 0.5, sal)[name]
    assert p["least_salient"] == sorted(range(layer.num_experts), key=lambda e: want[e])[:2]
