"""Ternary experts with dictionary coding (QMoE-style, ``QuantConfig(ternary=True)``): values in the ternary
set with the TWN threshold and scale (against a float64 brute force), the Tunstall codec's exact round trip
(random streams and a trained checkpoint's experts), the quantized model decodes exactly like fp32 experts
holding the dequantized weights, storage, typed errors."""

import itertools

import pytest
import torch

from moesaic.core.errors import ConfigError
from moesaic.inference.quant import QuantConfig, quantize_experts_
from moesaic.inference.quant_gptq import expert_hessians, gptq_ternary
from moesaic.inference.quant_ternary import TernaryExperts, dequantize_ternary, ternarize_groups
from moesaic.inference.tunstall import TunstallCode, entropy_bits
from offload_fixtures import decode, demo_lm


def _brute_twn(row: list[float], t: float) -> tuple[list[int], float]:
    """One group by the TWN rule, element by element in float64."""
    delta = t * sum(abs(x) for x in row) / len(row)
    vals = [(1 if x > 0 else -1) if abs(x) > delta else 0 for x in row]
    kept = [abs(x) for x, v in zip(row, vals, strict=True) if v]
    return vals, (sum(kept) / len(kept) if kept else 0.0)


@pytest.mark.parametrize(("group", "t"), [(8, 0.7), (0, 0.7), (16, 1.3)])
def test_ternary_values_and_twn_scale_match_brute_force(group, t):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 5, 32, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, 5, dtype=torch.float64)[:, None]
    w[1, 2] = 0.0  # an all-zero row: no weight kept, scale 0
    q, s = ternarize_groups(w, group, t)
    G = 32 // (group or 32)
    assert q.dtype == torch.int8 and s.shape == (2, 5, G) and set(q.unique().tolist()) <= {-1, 0, 1}
    for e, o, gi in itertools.product(range(2), range(5), range(G)):
        cols = slice(gi * (group or 32), (gi + 1) * (group or 32))
        vals, scale = _brute_twn(w[e, o, cols].tolist(), t)
        assert q[e, o, cols].tolist() == vals
        assert float(s[e, o, gi]) == pytest.approx(scale, rel=1e-6, abs=0.0)  # stored fp32
    assert float(s[1, 2].abs().max()) == 0.0
    deq = dequantize_ternary(q, s, torch.float64)
    assert set(deq[0, 0, : group or 32].abs().unique().tolist()) <= {0.0, float(s[0, 0, 0])}


@pytest.mark.parametrize(("code_bits", "p0"), [(8, 0.0), (8, 0.45), (8, 0.95), (16, 0.45)])
def test_tunstall_round_trip_is_exact(code_bits, p0):
    g = torch.Generator().manual_seed(int(100 * p0) + code_bits)
    n = 20011
    r = torch.rand(n, generator=g)
    t = torch.where(r < p0, 0, torch.where(r < (1 + p0) / 2, 1, -1)).to(torch.int8)
    s = TunstallCode.symbols(t)
    code = TunstallCode(torch.bincount(s.long(), minlength=3), code_bits)
    assert code.num_codes <= 2 ** code_bits and code.num_codes % 2 == 1  # a complete ternary tree's leaves
    c = code.encode(s)
    assert torch.equal(code.decode_values(c, n), t)
    assert torch.equal(TunstallCode.symbols(code.decode_values(c, n)), code.decode(c, n))  # the reference path
    for m in (0, 1, 2, 17):  # short streams end inside a codeword: the padding is dropped
        assert torch.equal(code.decode_values(code.encode(s[:m]), m), t[:m])
    H = entropy_bits(torch.bincount(s.long(), minlength=3))
    rate = c.numel() * code_bits / n
    assert H <= rate + 1e-9 and rate <= (1.7 if p0 < 0.5 else 0.8)  # sub-log2(3) where zeros dominate
    # a dictionary from other counts still codes every stream exactly (only less compactly)
    other = TunstallCode([1, 50, 3], code_bits)
    assert torch.equal(other.decode_values(other.encode(s), n), t)


def test_tunstall_dictionary_is_tunstalls():
    code = TunstallCode([70, 20, 10], 8, max_len=64)
    # the leaves are prefix-free and complete: every sequence of the longest length parses
    seqs = {tuple(code.table_CL[i, : int(code.len_C[i])].tolist()) for i in range(code.num_codes)}
    assert len(seqs) == code.num_codes
    assert not any(a != b and b[: len(a)] == a for a in seqs for b in seqs)
    # Tunstall's property: no leaf is more probable than the least probable expanded node times p_max
    p = torch.tensor([71, 21, 11], dtype=torch.float64) / 103
    prob = {s: float(torch.prod(p[list(s)])) for s in seqs}
    inner = {s[:i] for s in seqs for i in range(len(s))}
    assert max(prob.values()) <= min(float(torch.prod(p[list(s)])) for s in inner) + 1e-15


def test_round_trip_on_trained_experts(tmp_path, tiny_config):
    """Experts trained on Shakespeare (the tiny run, 30 steps): every expert decodes to its ternary values."""
    import moesaic
    from moesaic.cli import main

    assert main(["train", str(tiny_config), "--out", str(tmp_path / "run"), "--set", "train.max_steps=30",
                 "--set", "train.save_every=30"]) == 0
    model = moesaic.load(str(tmp_path / "run"))
    for layer in (m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "router")):
        ex = layer.experts
        for group, bits in ((0, 16), (8, 8)):
            q = TernaryExperts(ex, group, code_bits=bits)
            for name, proj in (("w_up_EHD", "up"), ("w_down_EDF", "down")):
                t, s = ternarize_groups(getattr(ex, name), group)
                assert torch.equal(q.get_buffer(f"s3_{proj}"), s)
                for e in range(ex.num_experts):
                    assert torch.equal(q.ternary_values(proj, e), t[e])
            assert 0.2 < q.zero_fraction() < 0.8 and q.code_bits_per_weight() < 1.75


def test_ternary_model_equals_fp32_model_with_dequantized_weights():
    q = demo_lm()
    qx = quantize_experts_(q, QuantConfig(ternary=True, group_size=8))
    ref = demo_lm()
    with torch.no_grad():
        for ex, layer in zip(qx.values(), [b.mlp for b in ref.model.layers], strict=True):
            assert isinstance(ex, TernaryExperts)
            for e in range(ex.num_experts):
                layer.experts.load_expert_state(e, ex.expert_state(e))
    want, got = decode(ref), decode(q)
    assert got[0] == want[0] and torch.equal(got[1], want[1])
    fp = decode(demo_lm())
    assert not torch.equal(got[1], fp[1])  # ternary weights do change the logits
    # load_expert_state re-codes one expert with the layer's dictionary; the others are untouched
    ex = next(iter(qx.values()))
    before = [ex.ternary_values("up", e) for e in range(ex.num_experts)]
    w = {k: -v for k, v in ex.expert_state(3).items()}
    ex.load_expert_state(3, w)
    assert torch.equal(ex.ternary_values("up", 3), -before[3])
    assert all(torch.equal(ex.ternary_values("up", e), before[e]) for e in range(ex.num_experts) if e != 3)


def test_ternary_storage_and_errors():
    m = demo_lm()
    n = sum(p.numel() for n, p in m.named_parameters() if "experts" in n)
    qx = quantize_experts_(m, QuantConfig(ternary=True, group_size=0, code_bits=8))
    total = sum(x.nbytes() for x in qx.values())
    codes = sum(x.get_buffer(f"c3_{p}").numel() for x in qx.values() for p in ("up", "down"))
    rows = sum(x.get_buffer(f"s3_{p}").numel() for x in qx.values() for p in ("up", "down"))
    # per layer: byte codewords, fp32 row scales, int64 offsets [E + 1] per projection, three int64 counts
    assert total == codes + 4 * rows + 2 * (2 * 8 * (8 + 1) + 3 * 8)
    assert total * 8 / n < 0.2 * 32
    assert not any("experts.w_" in k for k, _ in m.named_parameters())
    with pytest.raises(ConfigError, match="quant.ternary = True: cannot be combined with plan"):
        quantize_experts_(demo_lm(), QuantConfig(ternary=True, plan=True), usage={})
    with pytest.raises(ConfigError, match="quant.code_bits = 12: must be 8 or 16"):
        quantize_experts_(demo_lm(), QuantConfig(ternary=True, code_bits=12))
    with pytest.raises(ConfigError, match="quant.ternary_threshold = 0.0"):
        quantize_experts_(demo_lm(), QuantConfig(ternary=True, ternary_threshold=0.0))
    with pytest.raises(ConfigError, match="quant.group_size = 0: must be >= 1 .0, a whole row per scale, is for "
                                          "ternary experts only."):
        quantize_experts_(demo_lm(), QuantConfig(group_size=0))
    with pytest.raises(ConfigError, match="quant.group_size = 5: must divide the input width 16"):
        quantize_experts_(demo_lm(), QuantConfig(ternary=True, group_size=5))
    with pytest.raises(ConfigError, match="only stacked FFN experts"):
        quantize_experts_(m, QuantConfig(ternary=True))  # already quantized


def test_gptq_with_uncorrelated_inputs_is_the_data_free_rule():
    w = torch.randn(6, 32, dtype=torch.float64)
    for group in (8, 0):
        t, s = gptq_ternary(w, 3.0 * torch.eye(32, dtype=torch.float64), group)
        t0, s0 = ternarize_groups(w[None], group)
        assert torch.equal(t, t0[0]) and torch.equal(s, s0[0])


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(400, 32, generator=g, dtype=torch.float64) @ torch.randn(32, 32, generator=g, dtype=torch.float64)
    w = torch.randn(16, 32, generator=g, dtype=torch.float64)
    t, s = gptq_ternary(w, X.T @ X, 8)
    t0, s0 = ternarize_groups(w[None], 8)
    err = (X @ (w - dequantize_ternary(t[None], s[None], torch.float64)[0]).T).norm()
    err0 = (X @ (w - dequantize_ternary(t0, s0, torch.float64)[0]).T).norm()
    assert set(t.unique().tolist()) <= {-1, 0, 1} and err < 0.9 * err0  # 809 against 977 here


def test_expert_hessians_match_a_per_row_loop_and_gptq_model_runs():
    m = demo_lm()
    ids = torch.randint(40, (2, 12))
    seen = []
    layer = m.model.layers[0].mlp
    h = layer.experts.register_forward_pre_hook(lambda mod, args: seen.append(args))
    H = expert_hessians(m, [{"input_ids": ids}])
    h.remove()
    (x_TD, plan), = seen
    ex = layer.experts
    want_up = torch.zeros(8, 16, 16, dtype=torch.float64)
    want_down = torch.zeros(8, 32, 32, dtype=torch.float64)
    experts_N = torch.repeat_interleave(torch.arange(8), plan.counts_E)
    for n in range(plan.token_idx_N.numel()):
        e, x = int(experts_N[n]), x_TD[plan.token_idx_N[n]].double()
        gate, up = (ex.w_up_EHD[e].double() @ x).chunk(2)
        hid = torch.nn.functional.silu(gate) * up
        want_up[e] += torch.outer(x, x)
        want_down[e] += torch.outer(hid, hid)
    got = H["model.layers.0.mlp"]
    assert torch.allclose(got["up"], want_up, atol=1e-12) and torch.allclose(got["down"], want_down, atol=1e-12)
    q = demo_lm()
    qx = quantize_experts_(q, QuantConfig(ternary=True, gptq=True, group_size=8), hessians=H)
    assert len(qx) == 2 and decode(q)[0]
    with pytest.raises(ConfigError, match="quant.gptq = True: needs calibration Hessians for model.layers.0.mlp"):
        quantize_experts_(demo_lm(), QuantConfig(ternary=True, gptq=True, group_size=8))
    with pytest.raises(ConfigError, match="quant.gptq = True: is for ternary experts only"):
        quantize_experts_(demo_lm(), QuantConfig(gptq=True, group_size=8), hessians=H)
