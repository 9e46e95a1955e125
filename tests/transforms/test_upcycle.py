"""Sparse upcycling (transforms/upcycle.py): step-0 exactness of copies (moesaic LM in float64 and float32,
fine-grained with the zero router), drop-upcycling's exact fraction, multiplet experts from several inputs,
and every refusal as a typed error."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moesaic.core.errors import ConfigError, ConversionError
from moesaic.models.decoder import DecoderLM, DecoderLMConfig
from moesaic.moe.layer import MoELayer
from moesaic.transforms.convert import CONVERTERS
from moesaic.transforms.upcycle import UpcycleConfig, expert_counts, upcycle_

CFG = DecoderLMConfig(vocab_size=50, d_model=16, d_ff=32, num_layers=3)


def dense(seed: int = 0, dtype: torch.dtype = torch.float64, cfg: DecoderLMConfig = CFG) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(cfg).to(dtype)


def clone(m: DecoderLM) -> DecoderLM:
    c = DecoderLM(m.cfg).to(next(m.parameters()).dtype)
    c.load_state_dict(m.state_dict())
    return c


def logits(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(ids).logits


IDS = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_default_copy_upcycling_is_exact_at_step_0(dtype: torch.dtype, tol: float) -> None:
    m = dense(dtype=dtype)
    ref = logits(m, IDS)
    verb = CONVERTERS.get("upcycle")
    up = verb([clone(m)], verb.parse_config([]))
    layers = [x for x in up.modules() if isinstance(x, MoELayer)]
    assert len(layers) == 3 and all(x.num_experts == 8 and x.top_k == 2 for x in layers)
    assert up.cfg.moe is not None and up.cfg.moe.router.normalization == "renorm"
    assert (logits(up, IDS) - ref).abs().max().item() < tol
    rebuilt = DecoderLM(up.cfg).to(dtype)  # the config describes the new structure: the state loads by name
    rebuilt.load_state_dict(up.state_dict())
    assert torch.equal(logits(rebuilt, IDS), logits(up, IDS))
    counts = expert_counts(up)
    per_expert = 3 * 32 * 16
    assert counts["total"] - counts["active"] == 3 * 6 * per_expert


def test_router_zero_and_fine_grained_are_exact_and_segments_are_the_ffn() -> None:
    m = dense()
    ref = logits(m, IDS)
    up = upcycle_(clone(m), UpcycleConfig(num_experts=4, top_k=1, granularity=4, router_init="zero"))
    layer = up.model.layers[0].mlp
    assert isinstance(layer, MoELayer) and layer.num_experts == 16 and layer.top_k == 4
    assert torch.count_nonzero(layer.router.weight) == 0
    assert (logits(up, IDS) - ref).abs().max().item() < 1e-12
    ffn = m.model.layers[0].mlp
    st = layer.experts.expert_state(4 * 2 + 3)  # copy 2, segment 3: neurons 24..31, down scaled by m = 4
    assert torch.equal(st["w_up_EHD"][:8], ffn.gate_proj.weight[24:32])
    assert torch.equal(st["w_up_EHD"][8:], ffn.up_proj.weight[24:32])
    assert torch.equal(st["w_down_EDF"], 4 * ffn.down_proj.weight[:, 24:32])


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.1])
def test_drop_upcycling_changes_exactly_the_fraction_per_expert(fraction: float) -> None:
    m = dense()
    up = upcycle_(clone(m), UpcycleConfig(num_experts=4, drop_fraction=fraction, seed=3))
    F = 32
    n = round(fraction * F)
    picked = []
    for i in range(3):
        ffn, layer = m.model.layers[i].mlp, up.model.layers[i].mlp
        src = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight])
        for e in range(4):
            st = layer.experts.expert_state(e)
            changed_up = (st["w_up_EHD"] != src).any(-1)  # [2F] rows
            changed_down = (st["w_down_EDF"] != ffn.down_proj.weight).any(0)  # [F] columns
            neurons = changed_up[:F] | changed_up[F:] | changed_down
            assert int(neurons.sum()) == n, (i, e)
            assert torch.equal(changed_up[:F], neurons) and torch.equal(changed_up[F:], neurons)
            assert torch.equal(changed_down, neurons)
            picked.append(tuple(neurons.nonzero().flatten().tolist()))
    assert len(set(picked)) > 1  # each expert draws its own neurons


def test_layers_filter_keeps_other_layers_dense_and_round_trips() -> None:
    m = dense()
    ref = logits(m, IDS)
    up = upcycle_(clone(m), UpcycleConfig(layers=[1]))
    kinds = [type(x.mlp).__name__ for x in up.model.layers]
    assert kinds == ["DenseFFN", "MoELayer", "DenseFFN"]
    assert up.cfg.moe is None and up.cfg.layer_overrides[0].layers == [1]
    rebuilt = DecoderLM(up.cfg).double()
    rebuilt.load_state_dict(up.state_dict())
    assert (logits(rebuilt, IDS) - ref).abs().max().item() < 1e-12
    up2 = upcycle_(clone(m), UpcycleConfig(), filter_fn=lambda name, mod: name.endswith("layers.2.mlp"))
    assert [type(x.mlp).__name__ for x in up2.model.layers] == ["DenseFFN", "DenseFFN", "MoELayer"]


def test_multiplet_experts_come_from_each_input_and_bam_averages_the_rest() -> None:
    a, b = dense(0), dense(1)
    up = upcycle_(clone(a), UpcycleConfig(num_experts=4), extra=[clone(b)])
    layer = up.model.layers[0].mlp
    for e, src in enumerate([a, b, a, b]):
        ffn = src.model.layers[0].mlp
        assert torch.equal(layer.experts.expert_state(e)["w_down_EDF"], ffn.down_proj.weight)
    assert torch.equal(up.model.layers[0].self_attn.q_proj.weight, a.model.layers[0].self_attn.q_proj.weight)
    avg = upcycle_(clone(a), UpcycleConfig(num_experts=4, non_expert="average"), extra=[clone(b)])
    want = (a.model.layers[0].self_attn.q_proj.weight + b.model.layers[0].self_attn.q_proj.weight) / 2
    torch.testing.assert_close(avg.model.layers[0].self_attn.q_proj.weight, want, rtol=0, atol=1e-15)
    tied = dataclasses.replace(CFG, tie_word_embeddings=True)  # a tied LM head is averaged once, not twice
    a, b = dense(0, cfg=tied), dense(1, cfg=tied)
    want = (a.model.embed_tokens.weight + b.model.embed_tokens.weight) / 2
    avg = upcycle_(clone(a), UpcycleConfig(num_experts=2, non_expert="average"), extra=[clone(b)])
    assert avg.lm_head.weight is avg.model.embed_tokens.weight
    torch.testing.assert_close(avg.model.embed_tokens.weight, want, rtol=0, atol=1e-15)


def test_refusals_are_typed_and_name_the_reason() -> None:
    m = dense()
    with pytest.raises(ConversionError, match="not divisible"):
        upcycle_(clone(m), UpcycleConfig(num_experts=3), extra=[clone(m)])
    with pytest.raises(ConversionError, match="granularity 5 does not divide d_ff"):
        upcycle_(clone(m), UpcycleConfig(granularity=5))
    gelu = dense(cfg=dataclasses.replace(CFG, activation="gelu", gated=False))
    with pytest.raises(ConversionError, match="SwiGLU vs GELU"):
        upcycle_(clone(m), UpcycleConfig(num_experts=2), extra=[gelu])
    moe = upcycle_(clone(m), UpcycleConfig())
    with pytest.raises(ConversionError, match="no dense FFN found"):
        upcycle_(moe, UpcycleConfig())
    with pytest.raises(ConversionError, match="no FFN found"):
        upcycle_(torch.nn.Sequential(torch.nn.Linear(2, 2)), UpcycleConfig())
    verb = CONVERTERS.get("upcycle")
    with pytest.raises(ConfigError, match="top_k"):
        verb.parse_config(["num_experts=2", "top_k=3"])
    with pytest.raises(ConfigError, match="drop_fraction"):
        verb.parse_config(["drop_fraction=1.5"])
    with pytest.raises(ConfigError):
        verb.parse_config(["no_such_key=1"])
