"""BAM (Zhang et al. 2024): FFN experts and ``moa`` attention experts from several dense seeds
(transforms/upcycle_attention.py). N copies of one dense model give its logits at step 0 (float64, 1e-10) for
every routing variant; with different seeds expert i is exactly seed i's FFN and attention; non-expert
parameters are the first seed's or the mean; Hugging Face Llama folders through the CLI; ``moesaic train
--init-from`` continues from the output; refusals are typed and leave no OUT."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import yaml

import moesaic
from moesaic.cli import main
from moesaic.core.errors import ConfigError, ConversionError
from moesaic.models.attention import AttentionConfig
from moesaic.models.attention_moa import MixtureOfAttentionHeads
from moesaic.models.bert import BertEncoder, BertEncoderConfig
from moesaic.models.decoder import DecoderLM, DecoderLMConfig
from moesaic.moe.layer import MoELayer
from moesaic.transforms.convert import CONVERTERS
from moesaic.transforms.upcycle import UpcycleConfig, expert_counts, upcycle_
from upcycle_fixtures import hf_llama

transformers = pytest.importorskip("transformers")

ATT = AttentionConfig.for_kind("mha")
ATT.num_heads, ATT.num_key_value_heads, ATT.bias, ATT.o_bias = 4, 2, True, True  # type: ignore[attr-defined]
CFG = DecoderLMConfig(vocab_size=50, d_model=16, d_ff=32, num_layers=3, attention=ATT)
IDS = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(1))


def dense(seed: int, cfg: DecoderLMConfig = CFG) -> DecoderLM:
    torch.manual_seed(seed)
    m = DecoderLM(cfg).double()
    with torch.no_grad():  # non-zero biases, so that copying them is checked too
        for n, p in m.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    return m


def clone(m: DecoderLM) -> DecoderLM:
    c = DecoderLM(m.cfg).double()
    c.load_state_dict(m.state_dict())
    return c


def logits(m: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return m(ids).logits


@pytest.mark.parametrize("kw", [
    {},                                                          # soft routing, full per-expert attention
    {"attention_shared_kv": True, "router_init": "zero"},        # BAM's KV-sharing variant
    {"attention_top_k": 2, "attention_experts": 6},              # top-2 of 6 attention experts
    {"non_expert": "average", "num_experts": 6, "top_k": 2},
])
def test_copies_of_one_dense_model_give_its_logits_at_step_0(kw: dict) -> None:
    m, kw = dense(0), dict(kw)
    up = upcycle_(clone(m), UpcycleConfig(attention="moa", num_experts=kw.pop("num_experts", 3), **kw),
                  extra=[clone(m), clone(m)])
    attn = up.model.layers[1].self_attn
    assert isinstance(attn, MixtureOfAttentionHeads) and up.cfg.attention.kind == "moa"
    assert (logits(up) - logits(m)).abs().max().item() < 1e-10
    rebuilt = DecoderLM(up.cfg).double()  # the config describes the structure: the state loads by name
    rebuilt.load_state_dict(up.state_dict())
    assert torch.equal(logits(rebuilt), logits(up))
    up(IDS).logits.sum().backward()  # both the attention and the FFN routers get a gradient
    assert attn.router.weight.grad is not None and up.model.layers[1].mlp.router.weight.grad is not None


def test_expert_i_is_dense_model_i_and_non_expert_is_first_or_mean() -> None:
    seeds = [dense(0), dense(1)]
    up = upcycle_(clone(seeds[0]), UpcycleConfig(attention="moa", num_experts=4, router_init="zero"),
                  extra=[clone(seeds[1])])
    avg = upcycle_(clone(seeds[0]), UpcycleConfig(attention="moa", num_experts=4, non_expert="average",
                                                  attention_shared_kv=True), extra=[clone(seeds[1])])
    for i in range(3):
        for model in (up, avg):
            attn, ffn = model.model.layers[i].self_attn, model.model.layers[i].mlp
            assert attn.cfg.num_experts == 2 and attn.cfg.top_k == 2 and attn.router.cfg.normalization == "none"
            for e, src in enumerate(seeds):
                s_attn, s_ffn = src.model.layers[i].self_attn, src.model.layers[i].mlp
                names = ("q_proj", "o_proj") if model is avg else ("q_proj", "k_proj", "v_proj", "o_proj")
                for name in names:
                    for leaf in ("weight", "bias"):
                        assert torch.equal(getattr(getattr(attn.experts[e], name), leaf),
                                           getattr(getattr(s_attn, name), leaf)), (i, e, name, leaf)
                for copy_ in (e, e + 2):  # FFN expert e copies seed e % 2
                    st = ffn.experts.expert_state(copy_)
                    assert torch.equal(st["w_down_EDF"], s_ffn.down_proj.weight)
                    assert torch.equal(st["w_up_EHD"], torch.cat([s_ffn.gate_proj.weight, s_ffn.up_proj.weight]))
        assert torch.count_nonzero(up.model.layers[i].self_attn.router.weight) == 0
        assert torch.count_nonzero(avg.model.layers[i].self_attn.router.weight) > 0  # random
        a0, a1 = (s.model.layers[i].self_attn for s in seeds)
        assert torch.equal(avg.model.layers[i].self_attn.k_proj.weight, (a0.k_proj.weight + a1.k_proj.weight) / 2)
        n0, n1 = (s.model.layers[i].input_layernorm.weight for s in seeds)
        assert torch.equal(up.model.layers[i].input_layernorm.weight, n0)
        assert torch.equal(avg.model.layers[i].input_layernorm.weight, (n0 + n1) / 2)
    e0, e1 = (s.model.embed_tokens.weight for s in seeds)
    assert torch.equal(up.model.embed_tokens.weight, e0) and torch.equal(avg.model.embed_tokens.weight, (e0 + e1) / 2)
    assert torch.equal(up.lm_head.weight, seeds[0].lm_head.weight)
    counts = expert_counts(up)  # soft routing: every attention expert is active; FFN top-2 of 4
    per_ffn = 3 * 32 * 16
    assert counts["total"] - counts["active"] == 3 * 2 * per_ffn


def test_layers_setting_upcycles_attention_of_those_layers_only() -> None:
    m = dense(0)
    up = upcycle_(clone(m), UpcycleConfig(attention="moa", num_experts=2, layers=[1]), extra=[dense(1)])
    kinds = [type(b.self_attn).__name__ for b in up.model.layers]
    assert kinds == ["MultiHeadAttention", "MixtureOfAttentionHeads", "MultiHeadAttention"]
    assert up.cfg.attention.kind == "mha" and up.cfg.layer_overrides[0].attention.kind == "moa"
    rebuilt = DecoderLM(up.cfg).double()
    rebuilt.load_state_dict(up.state_dict())
    assert torch.equal(logits(rebuilt), logits(up))


def test_refusals_are_typed() -> None:
    m = dense(0)
    with pytest.raises(ConversionError, match="does not have the architecture"):
        upcycle_(clone(m), UpcycleConfig(attention="moa", num_experts=2),
                 extra=[dense(1, dataclasses.replace(CFG, d_ff=48))])
    with pytest.raises(ConversionError, match="attention_experts = 3: not divisible"):
        upcycle_(clone(m), UpcycleConfig(attention="moa", num_experts=2, attention_experts=3), extra=[dense(1)])
    with pytest.raises(ConversionError, match="attention_top_k = 3"):
        upcycle_(clone(m), UpcycleConfig(attention="moa", num_experts=2, attention_top_k=3), extra=[dense(1)])
    qk = copy.deepcopy(ATT)
    qk.qk_norm = True  # type: ignore[attr-defined]
    with pytest.raises(ConversionError, match="qk_norm"):
        upcycle_(dense(0, dataclasses.replace(CFG, attention=qk)), UpcycleConfig(attention="moa", num_experts=2))
    mla = dense(0, dataclasses.replace(CFG, attention=AttentionConfig.for_kind("mla")))
    with pytest.raises(ConversionError, match="'mla' cannot be upcycled into moa"):
        upcycle_(mla, UpcycleConfig(attention="moa", num_experts=2))
    bert = BertEncoder(BertEncoderConfig(vocab_size=30, d_model=16, num_heads=2, d_ff=32))
    with pytest.raises(ConversionError, match="needs a Transformer body"):
        upcycle_(bert, UpcycleConfig(attention="moa", num_experts=2))
    verb = CONVERTERS.get("upcycle")
    with pytest.raises(ConfigError, match="not streamed"):
        verb.parse_config(["attention=moa", "stream=true"])
    with pytest.raises(ConfigError, match="attention_router_init"):
        verb.parse_config(["attention=moa", "router_init=data", "router_data=x.txt"])


def test_hf_llama_folders_through_the_cli(tmp_path, capsys) -> None:
    ref = hf_llama(tmp_path / "l0", 0)
    hf_llama(tmp_path / "l1", 1)
    same = tmp_path / "same"
    assert main(["convert", "upcycle", str(tmp_path / "l0"), str(tmp_path / "l0"), str(same),
                 "--set", "attention=moa", "--set", "num_experts=4"]) == 0
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(moesaic.load(same)(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    out = tmp_path / "bam"
    assert main(["convert", "upcycle", str(tmp_path / "l0"), str(tmp_path / "l1"), str(out),
                 "--set", "attention=moa", "--set", "num_experts=2", "--set", "non_expert=average"]) == 0
    bam, seeds = moesaic.load(out), [moesaic.load(tmp_path / "l0"), moesaic.load(tmp_path / "l1")]
    for i in range(2):
        for e, s in enumerate(seeds):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                assert torch.equal(getattr(bam.model.layers[i].self_attn.experts[e], name).weight,
                                   getattr(s.model.layers[i].self_attn, name).weight)
            assert torch.equal(bam.model.layers[i].mlp.experts.expert_state(e)["w_down_EDF"],
                               s.model.layers[i].mlp.down_proj.weight)
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["convert", "upcycle", str(tmp_path / "l0"), str(tmp_path / "l1"), str(bad),
                 "--set", "attention=moa", "--set", "num_experts=2", "--set", "attention_experts=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "attention_experts" in err[0]
    assert not bad.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_train_init_from_a_bam_checkpoint(tmp_path, tiny_data, data_cache, capsys) -> None:
    data = copy.deepcopy(tiny_data)
    data["model"]["moe"] = None
    data["train"].update(max_steps=2, eval_every=2, save_every=2, dtype="float64")
    for seed in (0, 1):
        data["train"]["seed"] = seed
        (tmp_path / f"d{seed}.yaml").write_text(yaml.safe_dump(data))
        assert main(["train", str(tmp_path / f"d{seed}.yaml"), "--out", str(tmp_path / f"d{seed}")]) == 0
    assert main(["convert", "upcycle", str(tmp_path / "d0"), str(tmp_path / "d1"), str(tmp_path / "bam"),
                 "--set", "attention=moa", "--set", "num_experts=4", "--set", "non_expert=average"]) == 0
    capsys.readouterr()
    assert main(["train", str(tmp_path / "bam" / "step-00000000" / "config.yaml"), "--init-from",
                 str(tmp_path / "bam"), "--out", str(tmp_path / "cont"), "--set", "train.max_steps=1",
                 "--set", "train.eval_every=1", "--set", "train.save_every=1"]) == 0
    cont = moesaic.load(tmp_path / "cont")
    assert sum(isinstance(m, MoELayer) for m in cont.modules()) == 2
    assert sum(isinstance(m, MixtureOfAttentionHeads) for m in cont.modules()) == 2
