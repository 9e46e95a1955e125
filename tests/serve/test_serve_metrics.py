"""/metrics in process: expert load equals the routing decisions of the forwards (brute-force count from a
RoutingRecorder on the same forward), and a module that reports ``cache_stats()`` is exported as expert
cache hits and misses (the interface an expert cache is to provide; none exists in moesaic yet)."""

import torch

from decode_fixtures import tiny_lm
from moesaic.analysis.recorder import RoutingRecorder
from moesaic.serve.metrics import ServeMetrics


class _Counted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hits, self.misses = 0, 0

    def cache_stats(self):
        return {"hits": self.hits, "misses": self.misses}


def _samples(text, prefix):
    out = {}
    for ln in text.splitlines():
        if ln.startswith(prefix):
            name, v = ln.rsplit(" ", 1)
            out[name] = float(v)
    return out


def test_expert_load_matches_a_recorder_and_cache_stats_are_exported():
    model = tiny_lm()
    m = ServeMetrics(model)
    ids = torch.randint(0, 32, (3, 9), generator=torch.Generator().manual_seed(0))
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(ids)
    load = _samples(m.render().decode(), "moesaic_expert_tokens_total{")
    for layer, ids_TK in rec.topk_ids().items():
        counts = torch.bincount(ids_TK[ids_TK >= 0].flatten(), minlength=4).tolist()
        got = [load[f'moesaic_expert_tokens_total{{expert="{e}",layer="{layer}"}}'] for e in range(4)]
        assert got == counts and sum(counts) == 3 * 9 * 2, (layer, got, counts)
    assert "moesaic_expert_cache_hits" not in m.render().decode()
    m.close()
    model.cache = _Counted()
    model.cache.hits, model.cache.misses = 5, 2
    text = ServeMetrics(model).render().decode()
    assert 'moesaic_expert_cache_hits_total{module="cache"} 5.0' in text
    assert 'moesaic_expert_cache_misses_total{module="cache"} 2.0' in text
