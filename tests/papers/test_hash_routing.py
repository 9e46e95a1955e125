"""Hash layers (Roller et al. 2021): fixed id -> expert tables, balanced variant, no routing gradient."""

import pytest
import torch

import moesaic
from moesaic.core.errors import ConfigError, RoutingInputError
from moesaic.moe.routing.hash import balanced_table


def _layer(**router):
    return moesaic.moe_layer(16, 32, 4, 1, router={"kind": "hash", "vocab_size": 100, **router}).double()


def test_property1_same_id_same_expert_independent_of_context(ref):
    layer = _layer()
    ids = torch.randint(0, 100, (3, 7))
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    d = layer.router(x.reshape(-1, 16), token_ids=ids.reshape(-1))
    e_T = d.to_topk()[0][:, 0]
    assert torch.equal(e_T, layer.router.table_V[ids.reshape(-1)])
    x2 = torch.randn(3, 7, 16, dtype=torch.float64)  # other hidden states, same ids: same experts
    assert torch.equal(layer.router(x2.reshape(-1, 16), token_ids=ids.reshape(-1)).to_topk()[0][:, 0], e_T)
    y = layer(x, token_ids=ids).reshape(-1, 16)
    w_TE = torch.nn.functional.one_hot(e_T, 4).double()
    torch.testing.assert_close(y, ref.brute_force(layer, x.reshape(-1, 16), w_TE), atol=1e-12, rtol=0)


def test_random_table_is_seeded_and_saved():
    a, b, c = _layer(seed=1), _layer(seed=1), _layer(seed=2)
    assert torch.equal(a.router.table_V, b.router.table_V) and not torch.equal(a.router.table_V, c.router.table_V)
    assert set(a.router.table_V.tolist()) == {0, 1, 2, 3}
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.router.table_V, a.router.table_V)


def test_property2_balanced_loads_within_largest_frequency():
    torch.manual_seed(3)
    corpus = torch.distributions.Categorical(probs=torch.arange(1, 101).float() ** -1.1).sample((5000,))
    layer = _layer(variant="balanced")
    loads = layer.router.fit_balanced(corpus)
    largest = torch.bincount(corpus, minlength=100).max()
    assert loads.sum() == 5000 and loads.max() - loads.min() <= largest
    random_loads = torch.bincount(_layer().router.expert_of(corpus), minlength=4)
    assert (loads.max() - loads.min()) <= (random_loads.max() - random_loads.min())
    assert torch.equal(balanced_table(torch.ones(6), 3), torch.tensor([0, 1, 2, 0, 1, 2]))  # unfitted = id % E


def test_property3_no_routing_gradient():
    layer = _layer()
    assert list(layer.router.parameters()) == []
    x = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    d = layer.router(x, token_ids=torch.arange(10))
    assert not d.weight_N.requires_grad  # weight 1, no gate: nothing to backpropagate through routing


def test_oov_modulo_padding_and_errors():
    layer = _layer()
    t = layer.router.table_V
    assert torch.equal(layer.router.expert_of(torch.tensor([5, 105, 205, -95])), t[[5, 5, 5, 5]])
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    ids = torch.randint(0, 100, (2, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    y = layer(x, mask=mask, token_ids=ids)
    assert (y[~mask] == 0).all()
    torch.testing.assert_close(y[0, :3], layer(x[:1, :3], token_ids=ids[:1, :3])[0], atol=1e-12, rtol=0)
    with pytest.raises(RoutingInputError, match="token_ids"):
        layer(x)
    with pytest.raises(ConfigError, match="top_k"):
        moesaic.moe_layer(16, 32, 4, 2, router={"kind": "hash"})


def test_bigram_variant_hashes_previous_real_token():
    layer = _layer(variant="bigram", vocab_size=1000)
    r = layer.router
    ids = torch.tensor([[5, 7, 7, 9], [7, 5, 7, 3]])
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    seq = torch.arange(2).repeat_interleave(4)
    e = r(x.reshape(-1, 16), token_ids=ids.reshape(-1), seq_ids_T=seq).to_topk()[0][:, 0]
    prev = torch.tensor([-1, 5, 7, 7, -1, 7, 5, 7])  # each sequence starts from the sentinel -1
    assert torch.equal(e, r.table_V[(prev * 1000003 + ids.reshape(-1)).remainder(1000)])
    assert e[1] == e[6]  # the same (prev, id) pair (5, 7) in two places: the same expert
    # Padding is skipped: the previous *real* token counts.
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    d = r(x.reshape(-1, 16), mask.reshape(-1), token_ids=ids.reshape(-1), seq_ids_T=seq)
    ids_TK = d.to_topk()[0][:, 0]
    assert ids_TK[2] == r.table_V[(5 * 1000003 + 7) % 1000]
    # Context dependence: one id after many different previous ids reaches several experts.
    many = torch.stack([torch.arange(40), torch.full((40,), 11)], 1)
    e2 = r(torch.randn(80, 16, dtype=torch.float64), token_ids=many.reshape(-1),
           seq_ids_T=torch.arange(40).repeat_interleave(2)).to_topk()[0][1::2, 0]
    assert e2.unique().numel() > 1
