"""Affinity-aware expert placement (ExFlow: Yao et al. 2024, arXiv 2401.08383) and the routing recorder."""

import numpy as np
import pytest
import torch

import moesaic
from moesaic.analysis.recorder import RoutingRecorder
from moesaic.core.errors import ConfigError
from moesaic.distributed import placement as P


def random_traces(seed, L=4, E=8, T=200, k=2, structure=0.7):
    """Per-layer [T, k] ids where the next layer's first choice follows a hidden map with prob. structure."""
    g = np.random.default_rng(seed)
    maps = [g.permutation(E) for _ in range(L)]
    ids = [np.stack([g.permutation(E)[:k] for _ in range(T)])]
    for layer in range(1, L):
        nxt = np.stack([g.permutation(E)[:k] for _ in range(T)])
        follow = g.random(T) < structure
        first = np.where(follow, maps[layer][ids[-1][:, 0]], nxt[:, 0])
        second = np.where(nxt[:, 1] == first, nxt[:, 0], nxt[:, 1])
        second = np.where(second == first, (first + 1) % E, second)
        ids.append(np.stack([first, second], 1))
    return [torch.as_tensor(a, dtype=torch.long) for a in ids]


def test_affinity_conservation():
    ids = random_traces(0)
    N = P.affinity_counts(ids, 8)
    assert len(N) == 3
    for n in N:
        assert n.sum() == pytest.approx(200)  # one unit per token (k x k pairs weighted 1/k^2)
        rows = P.conditional(n).sum(1)
        assert np.allclose(rows[n.sum(1) > 0], 1.0)


def test_planted_permutation_reaches_zero_traffic():
    g = np.random.default_rng(1)
    e0 = g.integers(0, 8, 300)
    perms = [g.permutation(8) for _ in range(3)]
    ids = [torch.as_tensor(e0)[:, None]]
    for p in perms:
        ids.append(torch.as_tensor(p[ids[-1][:, 0].numpy()])[:, None])
    N = P.affinity_counts(ids, 8)
    for G in (2, 4):
        assert P.traffic(P.round_robin(4, 8, G), N) > 0
        pl, scores = P.solve(N, 8, G, "milp")
        assert scores["milp"] == 0 and P.traffic(pl, N) == 0
        assert P.traffic(P.heuristic(N, 8, G), N) == 0  # a pure permutation: greedy is exact
        for layer in pl:
            assert np.bincount(layer, minlength=G).tolist() == [8 // G] * G


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("G", [2, 4])
def test_never_worse_than_round_robin(seed, G):
    N = P.affinity_counts(random_traces(seed, structure=0.3 * seed), 8)
    rr = P.traffic(P.round_robin(4, 8, G), N)
    for method in ("milp", "heuristic"):
        pl, scores = P.solve(N, 8, G, method, time_limit=1.0)
        assert P.traffic(pl, N) <= rr
        assert scores[scores["chosen"]] == P.traffic(pl, N) == min(v for k, v in scores.items() if k != "chosen")


def test_milp_is_optimal_on_a_small_instance():
    """Brute force over every balanced placement of 3 layers x 4 experts on 2 ranks."""
    import itertools

    N = P.affinity_counts(random_traces(5, L=3, E=4, T=60, structure=0.5), 4)
    splits = [np.array(s) for s in itertools.product([0, 1], repeat=4) if sum(s) == 2]
    best = min(P.traffic([a, b, c], N) for a in splits for b in splits for c in splits)
    pl, optimal = P.milp(N, 4, 2, return_status=True)
    assert optimal and P.traffic(pl, N) == pytest.approx(best)
    assert best < P.traffic(P.round_robin(3, 4, 2), N)


def test_bad_rank_count():
    with pytest.raises(ConfigError, match="ranks"):
        P.round_robin(2, 6, 4)


def _two_layer_model():
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([moesaic.moe_layer(16, 32, 4, 2) for _ in range(2)]).double()
    moesaic.name_layers(layers)

    def fwd(x):
        for layer in layers:
            x = x + layer(x)
        return x

    return layers, fwd


def test_recorder_and_permutation_preserve_the_function():
    layers, fwd = _two_layer_model()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with RoutingRecorder(layers) as rec:
        y = fwd(x)
        fwd(x[:1])
    ids = rec.topk_ids()
    assert list(ids) == ["0", "1"] and ids["0"].shape == (20, 2)
    assert torch.equal(rec.tokens_per_expert()["1"], torch.bincount(ids["1"].reshape(-1), minlength=4))
    assert not layers[0].router._forward_hooks  # removed on exit
    order = np.array([2, 0, 3, 1])
    P.permute_experts_(layers[0], order)
    with RoutingRecorder(layers) as rec2:
        y2 = fwd(x)
    assert (y2 - y).abs().max() <= 1e-12
    inv = np.argsort(order)  # old expert e is now expert inv[e]
    assert torch.equal(rec2.topk_ids()["0"], torch.as_tensor(inv)[ids["0"][:15]])


@pytest.mark.parametrize("seed", range(3))
def test_refine_never_loses_co_located_mass(seed):
    N = P.affinity_counts(random_traces(seed, structure=0.4), 8)
    start = P.heuristic(N, 8, 4)
    better = P.refine(start, N, 4)
    assert P.traffic(better, N) <= P.traffic(start, N)
    for layer in better:
        assert np.bincount(layer, minlength=4).tolist() == [2] * 4
