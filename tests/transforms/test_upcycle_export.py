"""``hf-export`` of upcycled models: an upcycled Hugging Face Llama (and moesaic LM) exports as Mixtral,
loads in transformers and gives the same logits (1e-5); fine-grained upcycling exports as Mixtral of the
segmented experts; what has no Hugging Face architecture (non-renormalised weights, dense layers left,
attention biases, MoEfied FFNs) is a one-line ConversionError and nothing is written."""

from __future__ import annotations

import pytest
import torch
import transformers

import moesaic
from convert_fixtures import hf_llama
from moesaic.cli import main
from moesaic.core.errors import ConversionError
from moesaic.interop.hf import to_hf
from moesaic.models.decoder import DecoderLM, DecoderLMConfig
from moesaic.transforms.upcycle import UpcycleConfig, upcycle_

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))


def _hf_logits(folder) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(IDS).logits


@pytest.mark.parametrize("sets", [[], ["drop_fraction=0.5", "router_init=random"],
                                  ["granularity=2", "router_init=zero"],
                                  ["num_experts=4", "normalization=softmax_topk"]])
def test_upcycled_hf_llama_exports_as_mixtral(tmp_path, sets) -> None:
    ref = hf_llama(tmp_path / "llama")
    argv = [a for s in sets for a in ("--set", s)]
    assert main(["convert", "upcycle", str(tmp_path / "llama"), str(tmp_path / "moe"), *argv]) == 0
    assert main(["convert", "hf-export", str(tmp_path / "moe"), str(tmp_path / "hf")]) == 0
    cfg = transformers.AutoConfig.from_pretrained(str(tmp_path / "hf"))
    assert cfg.model_type == "mixtral"
    moe = moesaic.load(tmp_path / "moe")
    with torch.no_grad():
        ours = moe(IDS).logits
    got = _hf_logits(tmp_path / "hf")
    torch.testing.assert_close(got, ours, atol=1e-5, rtol=0)
    if "drop_fraction=0.5" not in sets:  # plain copies (and zero-router segments) are the dense model
        torch.testing.assert_close(got, ref(IDS).logits, atol=1e-5, rtol=0)
    if "granularity=2" in sets:  # the segments are exported as 16 experts of half width, 4 active
        assert (cfg.num_local_experts, cfg.intermediate_size, cfg.num_experts_per_tok) == (16, 16, 4)


def test_upcycled_moesaic_lm_exports_as_mixtral(tmp_path) -> None:
    torch.manual_seed(0)
    dense = DecoderLM(DecoderLMConfig(vocab_size=96, d_model=16, d_ff=32, num_layers=2)).eval()
    with torch.no_grad():
        want = dense(IDS).logits
    moe = upcycle_(dense, UpcycleConfig(num_experts=4, drop_fraction=0.25, seed=3)).eval()
    with torch.no_grad():
        ours = moe(IDS).logits
    assert not torch.allclose(ours, want, atol=1e-4)  # drop-upcycling changed the function
    assert to_hf(moe, tmp_path / "hf").model_type == "mixtral"
    torch.testing.assert_close(_hf_logits(tmp_path / "hf"), ours, atol=1e-5, rtol=0)


def test_what_cannot_be_exported_is_refused_by_feature(tmp_path, capsys) -> None:
    hf_llama(tmp_path / "llama")
    hf_llama(tmp_path / "llama_bias", attention_bias=True)
    cases = [
        ("llama", ["normalization=none"], "normalization 'none'"),
        ("llama", ["layers=[0]"], "per-layer MoE settings"),
        ("llama_bias", [], "attention"),
    ]
    for i, (src, sets, why) in enumerate(cases):
        argv = [a for s in sets for a in ("--set", s)]
        assert main(["convert", "upcycle", str(tmp_path / src), str(tmp_path / f"moe{i}"), *argv]) == 0
        capsys.readouterr()
        assert main(["convert", "hf-export", str(tmp_path / f"moe{i}"), str(tmp_path / f"hf{i}")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and why in err, err
        assert not (tmp_path / f"hf{i}").exists()
    assert main(["convert", "moefy", str(tmp_path / "llama"), str(tmp_path / "mfy"), "--set", "num_experts=4"]) == 0
    with pytest.raises(ConversionError, match="module_swaps"):
        to_hf(moesaic.load(tmp_path / "mfy"), tmp_path / "hf_mfy")
    assert not (tmp_path / "hf_mfy").exists()
