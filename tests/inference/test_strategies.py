"""MoE decoding strategies: dynamic k (k unchanged is bit-exact, k > E a typed error), SCMoE (beta = 0 is
the strong model; the contrast formula against a float64 brute force; the weak pass routes to the rank-r
expert), LLM-Drop (ranking, identity blocks, restore is exact), early exit (never exiting is the model;
stepwise decoding with the cache equals the full-sequence forward: state propagation)."""

import math

import pytest
import torch

import moesaic
from decode_fixtures import tiny_lm
from moesaic.core.errors import ConfigError
from moesaic.inference.dynamic_k import parse_top_k, set_top_k_
from moesaic.inference.early_exit import EarlyExitLM
from moesaic.inference.llm_drop import drop_sublayers_, rank_sublayers
from moesaic.inference.scmoe import contrast, scmoe_

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


def test_dynamic_k_unchanged_is_bit_exact_and_bad_k_is_typed():
    m = tiny_lm()
    base = m(IDS).logits
    h = set_top_k_(m, 2)  # the trained k
    assert torch.equal(m(IDS).logits, base)
    assert torch.equal(moesaic.generate(m, IDS, 8), (h.restore(), moesaic.generate(m, IDS, 8))[1])
    h = set_top_k_(m, {1: 1})
    assert m.model.layers[1].mlp.router.top_k == 1 and m.model.layers[0].mlp.router.top_k == 2
    assert not torch.equal(m(IDS).logits, base)
    h.restore()
    assert torch.equal(m(IDS).logits, base)
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.top_k = 5: must be in \[1, num_experts\] = \[1, 4\]"):
        set_top_k_(m, 5)
    with pytest.raises(ConfigError, match="not an MoE layer"):
        set_top_k_(m, {7: 1})
    assert parse_top_k(["3"]) == 3 and parse_top_k(["0=1", "1=2"]) == {0: 1, 1: 2}
    with pytest.raises(ConfigError):
        parse_top_k(["x"])


def test_scmoe_contrast_formula_and_beta_zero():
    g = torch.Generator().manual_seed(0)
    s, w = torch.randn(2, 11, generator=g, dtype=torch.float64), torch.randn(2, 11, generator=g, dtype=torch.float64)
    beta, alpha = 0.7, 0.2
    got = contrast(s, w, beta, alpha)
    for r in range(2):
        ps, pw = torch.softmax(s[r], -1), torch.softmax(w[r], -1)
        for v in range(11):
            want = (1 + beta) * math.log(ps[v]) - beta * math.log(pw[v]) if ps[v] >= alpha * ps.max() else -math.inf
            assert math.isclose(float(got[r, v]), want, rel_tol=1e-6, abs_tol=1e-6) or (want == -math.inf == got[r, v])
    m = tiny_lm()
    base = moesaic.generate(m, IDS, 8)
    sc = scmoe_(m, beta=0.0, alpha=0.0)
    assert torch.equal(moesaic.generate(sc, IDS, 8), base)
    seen = []
    layer = m.model.layers[0].mlp
    hook = layer.register_routing_hook(lambda lyr, d, p: seen.append(d))
    sc.routers[0].weak = True
    m(IDS)
    sc.routers[0].weak = False
    hook.remove()
    want = torch.topk(seen[0].probs_TE, 2).indices[:, 1]
    assert torch.equal(seen[0].to_topk()[0][:, 0], want)
    assert sc.unwrap() is m and type(layer.router).__name__ == "TopKRouter"
    with pytest.raises(ConfigError, match="weak_rank"):
        scmoe_(m, weak_rank=5)


def test_llm_drop_ranks_drops_and_restores():
    m = tiny_lm()
    base = m(IDS).logits
    calib = [{"input_ids": torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))}]
    scores = rank_sublayers(m, calib)
    assert len(scores) == 4 and all(a.cosine >= b.cosine for a, b in zip(scores, scores[1:]))
    h = drop_sublayers_(m, 1, kind="attn", scores=scores)
    first_attn = next(s for s in scores if s.kind == "attn")
    blk = m.model.layers[first_attn.layer]
    x = torch.randn(1, 3, 16)
    assert torch.equal(blk.self_attn(x, None), torch.zeros_like(x))
    assert not torch.equal(m(IDS).logits, base)
    assert moesaic.generate(m, IDS, 5).shape == (1, 13)  # a dropped attention writes no cache
    h.restore()
    assert torch.equal(m(IDS).logits, base)
    with pytest.raises(ConfigError, match="llm_drop.n"):
        drop_sublayers_(m, 3, kind="mlp", scores=scores)


def test_early_exit_never_is_the_model_and_stepwise_equals_full():
    m = tiny_lm(torch.float64)
    never = EarlyExitLM(m, 1.0, "similarity")  # cosine of distinct states never reaches 1 exactly
    torch.testing.assert_close(never(IDS).logits, m(IDS).logits, rtol=0, atol=1e-12)
    h1 = m.model.layers[0](m.model.embed_tokens(IDS), torch.arange(8)[None], None, None, None, IDS)
    conf = m.lm_head(m.model.norm(h1)).softmax(-1).amax(-1)
    for thr in (1 / 32, float(conf.median())):  # every token exits at layer 1 (max prob >= 1/V); about half
        ee = EarlyExitLM(m, thr, "confidence")
        out = moesaic.generate(ee, IDS, 10)
        depth = ee.exit_stats(reset=True)["mean_exit_layer"]
        assert depth == 1.0 if thr == 1 / 32 else 1.0 < depth < 2.0
        full = ee(out[:, :-1]).logits  # the full sequence at once: same exits, same frozen-state keys
        assert torch.equal(full[0, IDS.shape[1] - 1:].argmax(-1), out[0, IDS.shape[1]:])
    with pytest.raises(ConfigError, match="threshold"):
        EarlyExitLM(m, 0.0)
