"""Offloaded experts refuse bad input with typed errors: a cache smaller than k experts, an unknown policy
or prefetch mode, the oracle without a trace, a store for another model, a missing expert file or
manifest, an expert whose bytes do not match its sha256, a truncated file (at open, and after opening:
detected, never read), and an existing output folder."""

import json
import os

import pytest
import torch

from moesaic.core.errors import CheckpointCorruptError, ConfigError
from moesaic.inference.offload import DiskStore, OffloadConfig, expert_modules, offload_experts_, save_expert_store
from offload_fixtures import decode, demo_lm


@pytest.fixture
def store_dir(tmp_path):
    return save_expert_store(expert_modules(demo_lm(4)), tmp_path / "store")


def _layer_file(store_dir, i=0):
    return store_dir / json.loads((store_dir / "manifest.json").read_text())["layers"][i]["file"]


def test_cache_smaller_than_k_and_bad_options(store_dir):
    m = demo_lm(4)
    with pytest.raises(ConfigError, match=r"offload.cache_experts = 1: must be >= top_k = 2 of model.layers.0.mlp"):
        offload_experts_(m, DiskStore(store_dir), 1)
    with pytest.raises(ConfigError, match="offload.policy = 'mru'.*lfru"):
        offload_experts_(m, DiskStore(store_dir), OffloadConfig(cache_experts=2, policy="mru"))
    with pytest.raises(ConfigError, match="offload.prefetch"):
        offload_experts_(m, DiskStore(store_dir), OffloadConfig(cache_experts=2, prefetch="later"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="oracle.*trace"):
        offload_experts_(m, DiskStore(store_dir), OffloadConfig(cache_experts=2, policy="oracle"))
    with pytest.raises(ConfigError, match="does not fit the model's 8 experts"):
        offload_experts_(demo_lm(8), DiskStore(store_dir), 2)
    with pytest.raises(ConfigError, match="exists"):
        save_expert_store(expert_modules(m), store_dir)
    assert m.model.layers[0].mlp.experts.__class__.__name__ == "GLUExperts"  # nothing swapped on failure


def test_missing_file_and_manifest(store_dir, tmp_path):
    os.remove(_layer_file(store_dir, 1))
    with pytest.raises(CheckpointCorruptError, match="expert file missing.*model.layers.1.mlp"):
        DiskStore(store_dir)
    with pytest.raises(CheckpointCorruptError, match="no manifest.json"):
        DiskStore(tmp_path)


def test_hash_mismatch_detected_on_read_and_on_open(store_dir):
    f = _layer_file(store_dir)
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40  # a byte of the last expert's weights; size and header unchanged
    f.write_bytes(bytes(data))
    m = demo_lm(4)
    offload_experts_(m, DiskStore(store_dir), 4)
    with pytest.raises(CheckpointCorruptError, match="expert 3 of model.layers.0.mlp does not match its sha256"):
        for _ in range(3):  # expert 3 is read the first time a token routes to it
            decode(m)
    with pytest.raises(CheckpointCorruptError, match="sha256 does not match"):
        DiskStore(store_dir, verify="open")


def test_truncated_file_is_never_read(store_dir):
    f = _layer_file(store_dir)
    full = f.stat().st_size
    os.truncate(f, full - 100)
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        DiskStore(store_dir)
    os.truncate(f, full)  # restored size (zeros at the end): opens, then truncated while open
    store = DiskStore(store_dir, verify="none")
    os.truncate(f, full - 100)
    out = {n: torch.empty(s) for n, s in store.spec("model.layers.0.mlp").shapes.items()}
    with pytest.raises(CheckpointCorruptError, match="changed size since it was opened"):
        store.read_into("model.layers.0.mlp", 3, out)
