"""Group-wise int8 / int4 / planned experts (``quantize_experts_``): codes within half a scale step of the
weights, the quantized model decodes exactly like fp32 experts holding the dequantized weights (tokens and
logits, every backend; pruned experts as zero weights), memory, the usage plan, typed errors."""

import pytest
import torch

from moesaic.core.errors import ConfigError
from moesaic.inference.quant import (
    QuantConfig,
    dequantize_groups,
    dequantize_groups_int4,
    quantize_experts_,
    quantize_groups,
    quantize_groups_int4,
)
from moesaic.inference.quant_plan import expert_usage, usage_plan
from offload_fixtures import PROMPTS, decode, demo_lm


def test_codes_are_within_half_a_step():
    w = torch.randn(3, 8, 128, dtype=torch.float64) * torch.logspace(-3, 1, 128, dtype=torch.float64)
    q, s = quantize_groups(w, 32)
    assert q.dtype == torch.int8 and s.shape == (3, 8, 4) and int(q.abs().max()) == 127
    err = (dequantize_groups(q, s, torch.float64) - w).abs()
    assert bool((err <= s.repeat_interleave(32, -1) / 2 + 1e-12).all())
    q0, s0 = quantize_groups(torch.zeros(1, 2, 4), 4)  # all-zero groups: scale 0, codes 0
    assert not q0.any() and not dequantize_groups(q0, s0).any()


@pytest.mark.parametrize("backend", ["auto", "loop", "fused"])
def test_int8_model_equals_fp32_model_with_dequantized_weights(backend):
    q = demo_lm(backend=backend)
    qx = quantize_experts_(q, QuantConfig(group_size=16))
    ref = demo_lm(backend=backend)
    with torch.no_grad():
        for (_, ex), layer in zip(qx.items(), [b.mlp for b in ref.model.layers], strict=True):
            for e in range(ex.num_experts):
                layer.experts.load_expert_state(e, ex.expert_state(e))
    want, got = decode(ref), decode(q)
    assert got[0] == want[0] and torch.equal(got[1], want[1])
    fp = decode(demo_lm(backend=backend))
    assert (got[1] - fp[1]).abs().max() < 0.05  # and close to the fp32 model itself


def test_memory_and_errors():
    m = demo_lm()
    fp32 = sum(p.numel() * 4 for n, p in m.named_parameters() if "experts" in n)
    qx = quantize_experts_(m, QuantConfig(group_size=16))
    assert sum(x.nbytes() for x in qx.values()) == pytest.approx(fp32 * (1 + 4 / 16) / 4)
    assert not any("experts.w_" in n for n, _ in m.named_parameters())
    with pytest.raises(ConfigError, match="quant.group_size = 5: must divide the input width 16"):
        quantize_experts_(demo_lm(), QuantConfig(group_size=5))
    with pytest.raises(ConfigError, match="quant.bits = 3: must be 8 .int8. or 4 .int4."):
        quantize_experts_(demo_lm(), QuantConfig(bits=3))
    with pytest.raises(ConfigError, match="quant.group_size = 3: must be even for int4"):
        quantize_experts_(demo_lm(), QuantConfig(bits=4, group_size=3))
    with pytest.raises(ConfigError, match="quant.plan = True: needs routing counts for model.layers.0.mlp"):
        quantize_experts_(demo_lm(), QuantConfig(group_size=8, plan=True))
    with pytest.raises(ConfigError, match="quant.hot_fraction"):
        quantize_experts_(demo_lm(), QuantConfig(plan=True, hot_fraction=1.5), usage={})
    with pytest.raises(ConfigError, match="only stacked FFN experts"):
        quantize_experts_(m)  # already quantized


def test_int4_codes_within_half_a_step_and_exact_packing():
    w = torch.randn(2, 6, 64) * torch.linspace(0.1, 3.0, 6)[:, None]
    p, s, lo = quantize_groups_int4(w, 16)
    assert p.dtype == torch.uint8 and p.shape == (2, 6, 32) and s.shape == lo.shape == (2, 6, 4)
    err = (dequantize_groups_int4(p, s, lo) - w).abs().reshape(2, 6, 4, 16)
    assert bool((err <= s[..., None] / 2 + 1e-6).all())
    p2, _, _ = quantize_groups_int4(dequantize_groups_int4(p, s, lo), 16)  # codes survive a round trip
    assert torch.equal(p, p2)


@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_planned_model_equals_fp32_model_with_dequantized_weights(backend):
    q = demo_lm(backend=backend)
    usage = {f"model.layers.{i}.mlp": torch.tensor([9, 0, 5, 1, 7, 0, 2, 3]) for i in range(2)}
    qx = quantize_experts_(q, QuantConfig(group_size=8, plan=True, hot_fraction=0.5), usage)
    for ex in qx.values():
        assert ex.bits_E == usage_plan(usage["model.layers.0.mlp"], 0.5) == [8, 0, 8, 4, 8, 0, 4, 4]
    ref = demo_lm(backend=backend)
    with torch.no_grad():
        for ex, layer in zip(qx.values(), [b.mlp for b in ref.model.layers], strict=True):
            for e in range(ex.num_experts):  # pruned experts: zero weights
                layer.experts.load_expert_state(e, ex.expert_state(e))
    want, got = decode(ref), decode(q)
    assert got[0] == want[0] and torch.equal(got[1], want[1])
    assert sum(ex.pruned_rows for ex in qx.values()) > 0  # rows did reach the pruned experts
    weights = sum(p.numel() for n, p in demo_lm().named_parameters() if "experts" in n) // 16  # per expert
    # 2 layers x (3 int8 experts at 1 + 4/8 bytes per weight + 3 int4 at 0.5 + 8/8); pruned ones store nothing
    assert sum(x.nbytes() for x in qx.values()) == 2 * (3 * 1.5 + 3 * 1.5) * weights


def test_usage_plan_and_expert_usage():
    assert usage_plan(torch.tensor([5, 0, 9, 1]), hot_fraction=0.34) == [4, 0, 8, 4]
    assert usage_plan(torch.tensor([5, 0, 9, 1]), hot_fraction=1.0) == [8, 0, 8, 8]
    assert usage_plan(torch.tensor([0, 0]), hot_fraction=0.5) == [0, 0]
    m = demo_lm()
    ids = torch.randint(40, (2, 12))
    counts = expert_usage(m, [{"input_ids": ids}])
    assert set(counts) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert all(int(c.sum()) == 2 * 12 * 2 for c in counts.values())  # tokens x k


@pytest.mark.parametrize("mode", ["int8", "int4", "plan"])
def test_one_token_decode_dequantizes_in_the_matmul_bit_identically(mode, monkeypatch):
    """A batch-1 decode step dequantizes each active expert block by block inside its matmuls (several blocks
    per weight here: the block size is shrunk to the tiny model) and gives the fp32 model's tokens and logits
    with the dequantized weights, bit for bit; the blockwise path is the one that ran."""
    from moesaic.inference import quant_blockwise

    monkeypatch.setattr(quant_blockwise, "BLOCK_BYTES", 256)
    monkeypatch.setattr(quant_blockwise, "ROW_MULTIPLE", 8)
    calls = []
    real = quant_blockwise.blockwise_linear
    monkeypatch.setattr(quant_blockwise, "blockwise_linear", lambda *a: calls.append(a[1]) or real(*a))
    q = demo_lm()
    cfg = {"int8": QuantConfig(group_size=8), "int4": QuantConfig(bits=4, group_size=8),
           "plan": QuantConfig(group_size=8, plan=True, hot_fraction=0.5)}[mode]
    usage = {f"model.layers.{i}.mlp": torch.tensor([9, 0, 5, 1, 7, 0, 2, 3]) for i in range(2)} if mode == "plan" \
        else None
    qx = quantize_experts_(q, cfg, usage)
    ex0 = next(iter(qx.values()))
    H, D = 2 * ex0.d_ff, ex0.d_model
    assert quant_blockwise.block_rows(D, torch.float32) < H  # more than one block per up projection
    ref = demo_lm()
    with torch.no_grad():
        for ex, layer in zip(qx.values(), [b.mlp for b in ref.model.layers], strict=True):
            for e in range(ex.num_experts):
                layer.experts.load_expert_state(e, ex.expert_state(e))
    want, got = decode(ref, [PROMPTS[0]]), decode(q, [PROMPTS[0]])
    assert got[0] == want[0] and torch.equal(got[1], want[1])
    assert quant_blockwise.bitwise(torch.float32, H, D, quant_blockwise.block_rows(D, torch.float32))
    assert calls and set(calls) == {H, D}  # both projections of the decode steps ran blockwise
