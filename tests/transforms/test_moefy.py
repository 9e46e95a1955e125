"""MoEfication / EMoE (moesaic.transforms.moefy): exact at 100 % active in float64 for GELU (BERT, biases) and
SwiGLU (decoder LM) FFNs and every router, balanced splits, fast path == per-token reference, typed refusals."""

import numpy as np
import pytest
import torch

from moefy_fixtures import bert, llm
from moesaic.core.errors import ConfigError, ConversionError
from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.moefied import MoEfiedFFN
from moesaic.transforms.moefy import MoefyConfig, moefy_, set_active_
from moesaic.transforms.neuron_split import balanced_kmeans, coactivation_split

ROUTERS = ["centroid", "avgk", "mlp", "oracle"]


def _out(m, ids):
    o = m(ids)
    return o.last_hidden_state if hasattr(o, "last_hidden_state") else o.logits


def _calib(m):
    m(torch.randint(0, 50, (8, 12)))


@pytest.mark.parametrize("make", [bert, llm], ids=["gelu_bert", "swiglu_lm"])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("split", ["kmeans", "coactivation"])
def test_all_experts_active_equals_the_dense_model(make, router, split):
    torch.manual_seed(0)
    m = make()
    ids = torch.randint(0, 50, (3, 10))
    ref = _out(m, ids)
    new = moefy_(m, MoefyConfig(num_experts=4, active_fraction=1.0, router=router, split=split, mlp_steps=5),
                 calibrate=_calib)
    assert len(new) == 2 and all(isinstance(v, MoEfiedFFN) for v in new.values())
    torch.testing.assert_close(_out(m, ids), ref, rtol=0, atol=1e-12)
    # the split is a balanced partition of the neurons
    for moe in new.values():
        assert sorted(moe.neuron_idx_EF.flatten().tolist()) == list(range(32))
    # fewer experts change the output (the test can fail)
    set_active_(m, 0.25)
    assert (_out(m, ids) - ref).abs().max() > 1e-6


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("router", ROUTERS)
def test_fast_path_equals_the_per_token_reference(gated, router):
    torch.manual_seed(1)
    ffn = torch.nn.Sequential(DenseFFN(12, 48, "gelu" if not gated else "silu", gated=gated, bias=not gated).double())
    moefy_(ffn, MoefyConfig(num_experts=6, active_fraction=0.34, router=router, mlp_steps=5),
           calibrate=lambda f: f(torch.randn(64, 12, dtype=torch.float64)))
    moe = ffn[0]
    assert moe.top_k == 2
    x = torch.randn(4, 9, 12, dtype=torch.float64)
    torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=0, atol=1e-12)
    # brute force of the reference: the selected experts are the top-k scores
    x_TD = x.reshape(-1, 12)
    s_TE = moe.scores(x_TD)
    ids = moe.select(x_TD)
    assert torch.equal(ids.sort(-1).values, s_TE.argsort(-1, descending=True)[:, :2].sort(-1).values)


def test_balanced_kmeans_gives_equal_groups_and_finds_planted_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 10
    pts = np.concatenate([c + rng.normal(size=(6, 8)) for c in centres])
    labels = balanced_kmeans(pts, 4)
    assert np.bincount(labels).tolist() == [6, 6, 6, 6]
    for g in range(4):  # each planted cluster is one group
        assert len(set(labels[g * 6:(g + 1) * 6])) == 1


def test_coactivation_split_groups_neurons_that_fire_together():
    g = torch.Generator().manual_seed(0)
    groups = torch.arange(12) % 3  # neurons 0,3,6,9 fire together, ...
    which = torch.randint(0, 3, (400,), generator=g)
    active = (groups[None, :] == which[:, None]) & (torch.rand(400, 12, generator=g) > 0.1)
    labels = coactivation_split(active, 3)
    for k in range(3):
        assert len(set(labels[(groups == k).numpy()])) == 1


def test_refusals_are_typed_and_leave_the_model_unchanged():
    m = bert()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConversionError, match="no FFN found"):
        moefy_(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    with pytest.raises(ConversionError, match="gated"):
        moefy_(m, MoefyConfig(num_experts=4, gated=True))
    with pytest.raises(ConversionError, match="uses gelu"):
        moefy_(m, MoefyConfig(num_experts=4, activation="silu"))
    with pytest.raises(ConfigError, match="divisible"):
        moefy_(m, MoefyConfig(num_experts=5))
    with pytest.raises(ConfigError, match="calibration"):
        moefy_(m, MoefyConfig(num_experts=4, router="mlp"))
    assert not any(isinstance(x, MoEfiedFFN) for x in m.modules())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    with pytest.raises(ConfigError):
        set_active_(m, 0.0)


def test_filter_selects_layers():
    m = llm()
    new = moefy_(m, MoefyConfig(num_experts=4), filter_fn=lambda name, mod: name.startswith("model.layers.0"))
    assert list(new) == ["model.layers.0.mlp"]
    assert isinstance(m.model.layers[1].mlp, DenseFFN)
