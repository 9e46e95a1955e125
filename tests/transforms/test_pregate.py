"""Read-ME pre-gates (moesaic.moe.pregate, moesaic.transforms.pregate): the call contract, recall against
a brute-force count, learning a planted routing, and the model left unchanged."""

import torch

from moesaic.moe.layer import MoELayer
from moesaic.moe.pregate import PreGate
from moesaic.train.run_config import load_run_config
from moesaic.transforms.pregate import PregateConfig, fit_pregates, pregate_recall, record


def lm():
    data = {"model": {"kind": "decoder_lm", "vocab_size": 40, "d_model": 12, "num_layers": 2, "d_ff": 16,
                      "max_seq_len": 16, "attention": {"num_heads": 2},
                      "moe": {"d_ff": 8, "num_experts": 4, "top_k": 1,
                              "router": {"kind": "topk", "normalization": "none"}}}}
    torch.manual_seed(0)
    return load_run_config(data=data).model.build().eval()


IDS = torch.randint(0, 40, (16, 12), generator=torch.Generator().manual_seed(1))


def calib(m):
    m(IDS)


def test_pregate_call_contract():
    g = PreGate(12, 4, hidden=8)
    h = torch.randn(2, 5, 12)
    assert g(h).shape == (2, 5, 4) and g.topk(h, 2).shape == (2, 5, 2)


def test_fit_learns_the_routing_and_leaves_the_model_unchanged():
    m = lm()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    gates = fit_pregates(m, PregateConfig(hidden=32, steps=300), calibrate=calib)
    assert set(gates) == {n for n, x in m.named_modules() if isinstance(x, MoELayer)}
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    rec = pregate_recall(m, gates, calib)
    # brute force of recall for one layer
    name = sorted(gates)[0]
    h, y = record(m, [(name, m.get_submodule(name))], calib)[name]
    hits = sum(int(y[t, gates[name](h[t]).argmax()]) for t in range(h.shape[0]))
    assert abs(rec[name] - hits / h.shape[0]) < 1e-9
    # well above chance (top-1 of 4 experts: 0.25) on the data it was fitted on
    assert rec[name] > 0.5
    untrained = {n: PreGate(12, 4) for n in gates}
    assert pregate_recall(m, untrained, calib)[name] < rec[name]
