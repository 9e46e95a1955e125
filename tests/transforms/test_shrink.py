"""Shrinking verbs (moesaic.transforms.prune / merge / densify): shapes, router renormalisation, exactness
where it must hold (float64 brute force), OT merge of a permuted copy, typed refusals leaving the model as it was."""

import pytest
import torch

from moesaic.core.errors import ConfigError, ConversionError
from moesaic.moe.layer import MoELayer
from moesaic.train.run_config import load_run_config
from moesaic.transforms.densify import densify_
from moesaic.transforms.ewa_merge import MergedFFN
from moesaic.transforms.expert_select import expert_forward, expert_stats, moe_layers
from moesaic.transforms.merge import MergeConfig, merge_
from moesaic.transforms.prune import PruneConfig, prune_


def lm(normalization="renorm", experts="glu", **moe):
    m = {"d_ff": 8, "num_experts": 8, "top_k": 2, "router": {"kind": "topk", "normalization": normalization},
         "experts": {"kind": experts}, **moe}
    data = {"model": {"kind": "decoder_lm", "vocab_size": 40, "d_model": 12, "num_layers": 2, "d_ff": 16,
                      "max_seq_len": 16, "attention": {"num_heads": 2}, "moe": m}}
    torch.manual_seed(0)
    return load_run_config(data=data).model.build().double().eval()


IDS = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(1))


def calib(m):
    m(IDS)


def _layers(m):
    return [x for x in m.modules() if isinstance(x, MoELayer)]


def test_stats_equal_a_brute_force_loop():
    m = lm()
    layers = moe_layers(m, None, "prune")
    got = expert_stats(m, layers, calib)
    name, layer = layers[0]
    xs = []
    h = layer.register_forward_pre_hook(lambda mod, a: xs.append(a[0].reshape(-1, 12)))
    m(IDS)
    h.remove()
    x_TD = xs[0]
    d = layer.router(x_TD)
    usage = torch.zeros(8, dtype=torch.float64)
    sal = torch.zeros(8, dtype=torch.float64)
    for t, e, w in zip(d.token_idx_N.tolist(), d.expert_idx_N.tolist(), d.weight_N.tolist()):
        usage[e] += 1
        sal[e] += abs(w) * expert_forward(layer.experts, e, x_TD[t:t + 1]).norm()
    torch.testing.assert_close(got[name]["usage"], usage)
    torch.testing.assert_close(got[name]["saliency"], sal)


@pytest.mark.parametrize("by", ["usage", "saliency", "random"])
def test_prune_shapes_and_renormalised_router(by):
    m = lm()
    x = torch.randn(30, 12, dtype=torch.float64)
    old = _layers(m)[0]
    y_old = old(x)
    kept = prune_(m, PruneConfig(by=by, keep=4), calibrate=calib)
    new = _layers(m)[0]
    assert new.num_experts == 4 and new.experts.w_up_EHD.shape[0] == 4 and new.router.weight.shape == (4, 12)
    assert m.cfg.moe.num_experts == 4  # the config follows, so a checkpoint builds the new shape
    ids = list(kept.values())[0]
    torch.testing.assert_close(new.router.weight, old.router.weight[ids])
    d = new.router(x)
    torch.testing.assert_close(d.probs_TE.sum(-1), torch.ones(30, dtype=torch.float64))  # renormalised
    # a token whose top-2 experts were both kept is routed, and computed, exactly as before (renorm)
    ids_TK = old.router(x).to_topk()[0]
    keep = torch.tensor([set(r.tolist()) <= set(ids) for r in ids_TK])
    assert keep.any()
    torch.testing.assert_close(new(x)[keep], y_old[keep], rtol=0, atol=1e-12)
    m(IDS)  # the whole model still runs


def test_prune_by_usage_keeps_the_most_used():
    m = lm()
    layers = moe_layers(m, None, "prune")
    usage = expert_stats(m, layers, calib)[layers[0][0]]["usage"]
    kept = prune_(m, PruneConfig(by="usage", keep=3), calibrate=calib)
    ids = list(kept.values())[0]
    assert sorted(usage[ids].tolist()) == sorted(usage.sort(descending=True).values[:3].tolist())


def test_ot_merge_of_a_permuted_copy_recovers_the_original():
    m = lm(num_experts=2, top_k=1, normalization="none")
    layer = _layers(m)[0]
    ex = layer.experts
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        up, down = ex.w_up_EHD[0], ex.w_down_EDF[0]
        ex.w_up_EHD[1] = torch.cat([up[:8][perm], up[8:][perm]])
        ex.w_down_EDF[1] = down[:, perm]
    orig = {k: v[0].clone() for k, v in {"u": ex.w_up_EHD, "d": ex.w_down_EDF}.items()}
    import copy
    m2 = copy.deepcopy(m)
    merge_(m, MergeConfig(method="ot", num_experts=1), filter_fn=lambda n, layer: n == "model.layers.0.mlp")
    merge_(m2, MergeConfig(method="average", num_experts=1), filter_fn=lambda n, layer: n == "model.layers.0.mlp")
    ot, avg = _layers(m)[0].experts, _layers(m2)[0].experts
    torch.testing.assert_close(ot.w_up_EHD[0], orig["u"], rtol=0, atol=1e-12)
    torch.testing.assert_close(ot.w_down_EDF[0], orig["d"], rtol=0, atol=1e-12)
    assert (avg.w_up_EHD[0] - orig["u"]).abs().max() > 1e-3  # the plain average is not the original


def test_merge_shapes_groups_and_router_rows():
    m = lm()
    old = _layers(m)[0]
    rows = old.router.weight.clone()
    groups = merge_(m, MergeConfig(method="average", num_experts=4))
    g = list(groups.values())[0]
    assert sorted(sum(g, [])) == list(range(8)) and all(len(x) == 2 for x in g)
    new = _layers(m)[0]
    assert new.num_experts == 4 and new.top_k == 2 and m.cfg.moe.num_experts == 4
    torch.testing.assert_close(new.router.weight, torch.stack([rows[x].mean(0) for x in g]))
    torch.testing.assert_close(new.experts.w_down_EDF[0], old.experts.w_down_EDF[g[0]].mean(0))
    m(IDS)


def test_densify_is_the_ewa_average():
    m = lm()
    old = _layers(m)[0]
    merged = densify_(m)
    assert len(merged) == 2 and not _layers(m)
    ffn = merged["model.layers.0.mlp"]
    assert isinstance(ffn, MergedFFN)
    torch.testing.assert_close(ffn.down_proj.weight, old.experts.w_down_EDF.mean(0))


def test_refusals_are_typed_and_change_nothing():
    m = lm()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match="divisible"):
        merge_(m, MergeConfig(num_experts=3))
    with pytest.raises(ConfigError, match="calibration"):
        prune_(m, PruneConfig(by="saliency", keep=4))
    with pytest.raises(ConfigError, match="only 8 experts"):
        prune_(m, PruneConfig(by="random", keep=9))
    dense_cfg = {"kind": "decoder_lm", "vocab_size": 40, "d_model": 12, "num_layers": 1, "d_ff": 16,
                 "max_seq_len": 16, "attention": {"num_heads": 2}}
    dense = load_run_config(data={"model": dense_cfg}).model.build()
    for verb in (lambda x: prune_(x, PruneConfig(by="random")), lambda x: merge_(x), densify_):
        with pytest.raises(ConversionError, match="no MoE layer"):
            verb(dense)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
