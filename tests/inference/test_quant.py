"""Group-wise int8 experts (``quantize_experts_``): codes within half a scale step of the weights, the
quantized model decodes exactly like fp32 experts holding the dequantized weights (tokens and logits,
every backend), memory about 0.27x of fp32 at group 64, typed errors."""

import pytest
import torch

from moesaic.core.errors import ConfigError
from moesaic.inference.quant import QuantConfig, dequantize_groups, quantize_experts_, quantize_groups
from offload_fixtures import decode, demo_lm


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
    with pytest.raises(ConfigError, match="quant.bits = 4"):
        quantize_experts_(demo_lm(), QuantConfig(bits=4))
    with pytest.raises(ConfigError, match="only stacked FFN experts"):
        quantize_experts_(m)  # already quantized
