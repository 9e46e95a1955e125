"""Streamed upcycling (``--set stream=true``): the inputs are read tensor by tensor from their (sharded)
safetensors files and the expert stacks are made while the checkpoint is written. The output equals the
in-memory conversion exactly, tensor by tensor, for every upcycling variant and both input kinds; under a
memory cap that the in-memory conversion exceeds, the streamed one succeeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch as st
import torch

import moesaic
from convert_fixtures import hf_llama
from moesaic.cli import main


def _tensors(out) -> dict[str, torch.Tensor]:
    return st.load_file(str(out / "step-00000000" / "model.safetensors"))


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _sharded_llama(folder, seed: int = 0, **kw):
    model = hf_llama(folder / "one", seed=seed, **kw)
    model.save_pretrained(str(folder / "sharded"), max_shard_size="8KB")
    assert len(list((folder / "sharded").glob("*.safetensors"))) >= 3
    return model, folder / "sharded"


VARIANTS = {
    "copy_random_router": [],
    "drop": ["--set", "drop_fraction=0.5", "--set", "seed=3", "--set", "num_experts=4"],
    "fine_grained_zero_router": ["--set", "granularity=2", "--set", "router_init=zero", "--set", "num_experts=4"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_streamed_upcycle_equals_the_in_memory_one(tmp_path, variant) -> None:
    ref, src = _sharded_llama(tmp_path)
    sets = VARIANTS[variant]
    assert main(["convert", "upcycle", str(src), str(tmp_path / "s"), *sets, "--set", "stream=true"]) == 0
    assert main(["convert", "upcycle", str(src), str(tmp_path / "m"), *sets]) == 0
    _assert_identical(_tensors(tmp_path / "s"), _tensors(tmp_path / "m"))
    if variant != "drop":  # plain copies with renormalised top-k: the dense model at step 0
        ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(moesaic.load(tmp_path / "s")(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_streamed_multiplet_and_checkpoint_inputs_equal_the_in_memory_ones(tmp_path) -> None:
    _, a = _sharded_llama(tmp_path / "a", seed=0, tie_word_embeddings=True)
    _, b = _sharded_llama(tmp_path / "b", seed=1, tie_word_embeddings=True)
    assert main(["convert", "hf-import", str(b), str(tmp_path / "b_ckpt")]) == 0  # a moesaic checkpoint input
    lazy = moesaic.load(tmp_path / "b_ckpt", lazy=True)
    assert all(p.is_meta for p in lazy.parameters()) and lazy.lm_head.weight is lazy.model.embed_tokens.weight
    sets = ["--set", "num_experts=4", "--set", "non_expert=average", "--set", "drop_fraction=0.25"]
    ins = [str(a), str(tmp_path / "b_ckpt")]
    assert main(["convert", "upcycle", *ins, str(tmp_path / "s"), *sets, "--set", "stream=true"]) == 0
    assert main(["convert", "upcycle", *ins, str(tmp_path / "m"), *sets]) == 0
    s, m = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    _assert_identical(s, m)
    assert "lm_head.weight" not in s  # tied: stored once


def test_stream_refuses_a_router_from_data(tmp_path) -> None:
    _, src = _sharded_llama(tmp_path)
    (tmp_path / "t.txt").write_text("some text " * 50)
    assert main(["convert", "upcycle", str(src), str(tmp_path / "x"), "--set", "stream=true", "--set",
                 "router_init=data", "--set", f"router_data={tmp_path / 't.txt'}"]) == 2
    assert not (tmp_path / "x").exists()


# The child first converts a tiny model the same way (so that every module the conversion imports is loaded),
# then measures its writable data size (VmData), caps RLIMIT_DATA at that plus MARGIN and converts the real
# one. File mappings (safetensors' mmap) do not count against RLIMIT_DATA; heap and anonymous memory do.
# MALLOC_MMAP_THRESHOLD_ keeps glibc from serving large tensors from a heap it does not shrink, so VmData
# follows the tensors alive (it changes where glibc takes memory from, not how much the conversion needs).
PROBE = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from moesaic.cli import main
tiny, scratch, src, out, margin, *sets = sys.argv[1:]
assert main(["convert", "upcycle", tiny, scratch, *sets]) == 0
def status(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key + ":"))) * 1024
base = status("VmData")
resource.setrlimit(resource.RLIMIT_DATA, (base + int(margin), base + int(margin)))
try:
    rc = main(["convert", "upcycle", src, out, *sets])
except (MemoryError, RuntimeError) as e:
    rc = f"{type(e).__name__}: {str(e)[:60]}"
mib = lambda b: round(b / 2**20, 1)
print(json.dumps({"rc": rc, "base_data_mib": mib(base), "peak_rss_mib": mib(status("VmHWM"))}))
"""
MARGIN = 64 * 2**20


def _capped(tmp_path, src, out, *sets: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    r = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "tiny" / "sharded"), str(tmp_path / f"{out}_tiny"),
                        str(src), str(tmp_path / out), str(MARGIN), *sets], capture_output=True, text=True, env=env)
    lines = r.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):  # killed by an allocation failure outside Python (an abort)
        return {"rc": f"exit {r.returncode}", "stderr": r.stderr[-300:]}
    return json.loads(lines[-1])


@pytest.mark.slow
def test_streamed_upcycle_converts_under_a_memory_cap_that_the_in_memory_one_exceeds(tmp_path) -> None:
    hf = hf_llama(tmp_path / "one", hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=1024, max_position_embeddings=128)
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="8MB")
    del hf
    _sharded_llama(tmp_path / "tiny")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) >= 4
    dense_mib = sum(p.stat().st_size for p in shards) / 2**20
    streamed = _capped(tmp_path, tmp_path / "sharded", "streamed", "--set", "stream=true")
    out = tmp_path / "streamed" / "step-00000000" / "model.safetensors"
    assert streamed["rc"] == 0, streamed
    out_mib = out.stat().st_size / 2**20
    in_memory = _capped(tmp_path, tmp_path / "sharded", "in_memory")
    print(f"dense {dense_mib:.1f} MiB in {len(shards)} shards -> upcycled {out_mib:.1f} MiB; cap = baseline + "
          f"{MARGIN / 2**20:.0f} MiB of data; streamed {streamed}; in memory {in_memory}")
    assert out_mib > 3 * MARGIN / 2**20 and dense_mib < MARGIN / 2**20
    assert in_memory["rc"] != 0 and not (tmp_path / "in_memory").exists()  # the cap binds: the test can fail
    lazy = moesaic.load(tmp_path / "streamed", lazy=True)  # the output reads back (hashes checked in chunks)
    assert lazy.lazy_state["model.layers.7.mlp.experts.w_down_EDF"].make().shape == (8, 256, 1024)
