"""Streaming upcycling (``--set stream=true``): a sharded Hugging Face Llama (``save_pretrained`` with a small
``max_shard_size``) upcycled into a model about 25 times its size; the peak resident memory of the converting
process grows by less than half the converted model's size, and the streamed checkpoint is bit-identical to the one
built in memory (routers aside)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors.torch as st
import torch

import moesaic
from convert_fixtures import hf_llama
from moesaic.cli import main

PROBE = r"""
import gc, json, resource, sys
import moesaic
from moesaic.cli import main
dense = moesaic.load(sys.argv[1]); del dense; gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert main(["convert", "upcycle", sys.argv[1], sys.argv[2], "--set", "num_experts=32", *sys.argv[3:]]) == 0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "after_kib": after}))
"""


def _grow_mib(src, out, *sets: str) -> float:
    r = subprocess.run([sys.executable, "-c", PROBE, str(src), str(out), *sets], capture_output=True, text=True,
                       check=True)
    rss = json.loads(r.stdout.strip().splitlines()[-1])
    return (rss["after_kib"] - rss["before_kib"]) / 1024


@pytest.mark.slow
def test_streamed_upcycle_of_a_sharded_model_stays_under_its_size(tmp_path) -> None:
    src = tmp_path / "llama"
    hf_llama(src, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=256)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(src)).save_pretrained(str(tmp_path / "sharded"), max_shard_size="1MB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) >= 3
    dense_mib = sum(p.stat().st_size for p in shards) / 2**20
    streamed = _grow_mib(tmp_path / "sharded", tmp_path / "streamed", "--set", "stream=true")
    out_mib = (tmp_path / "streamed" / "step-00000000" / "model.safetensors").stat().st_size / 2**20
    assert out_mib > 20 * dense_mib  # 32 copies of the FFNs
    print(f"dense {dense_mib:.1f} MiB, upcycled {out_mib:.1f} MiB; peak RSS growth streamed {streamed:.1f} MiB")
    assert streamed < 0.5 * out_mib
    assert main(["convert", "upcycle", str(tmp_path / "sharded"), str(tmp_path / "in_memory"),
                 "--set", "num_experts=32"]) == 0
    a = st.load_file(str(tmp_path / "streamed" / "step-00000000" / "model.safetensors"))
    b = st.load_file(str(tmp_path / "in_memory" / "step-00000000" / "model.safetensors"))
    routers = {k for k in a if "router" in k}  # drawn in another order; everything else is bitwise
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a.keys() - routers)


def test_streamed_upcycle_equals_the_in_memory_one(tmp_path) -> None:
    ref = hf_llama(tmp_path / "llama")
    sets = ["--set", "router_init=zero", "--set", "granularity=2", "--set", "num_experts=4"]
    llama = str(tmp_path / "llama")
    assert main(["convert", "upcycle", llama, str(tmp_path / "s"), *sets, "--set", "stream=true"]) == 0
    assert main(["convert", "upcycle", str(tmp_path / "llama"), str(tmp_path / "m"), *sets]) == 0
    a = st.load_file(str(tmp_path / "s" / "step-00000000" / "model.safetensors"))
    b = st.load_file(str(tmp_path / "m" / "step-00000000" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moesaic.load(tmp_path / "s")(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    assert main(["convert", "upcycle", str(tmp_path / "llama"), str(tmp_path / "x"), "--set", "stream=true",
                 "--set", "drop_fraction=0.5"]) == 2
    assert not (tmp_path / "x").exists()
