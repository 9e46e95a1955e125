"""Zero-copy slots (docs/inference.md, "Offloaded experts"): the store writes every expert tensor at a
page-aligned offset in a file that the safetensors library reads as usual; CPU cache slots then map the
file's pages instead of copying them, and decoding gives the resident model's tokens and logits bit for bit
for every cache size and prefetch mode, with no slot memory of the process's own; the file's size is
checked before every mapping and each expert's sha256 on its first mapping."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from moesaic.core.errors import CheckpointCorruptError
from moesaic.inference.offload import (
    DiskStore,
    OffloadConfig,
    expert_modules,
    mapped,
    offload_experts_,
    save_expert_store,
)
from moesaic.inference.offload.aligned import write_aligned
from moesaic.models.decoder import DecoderLM, DecoderLMConfig
from moesaic.moe.experts.base import ExpertsConfig
from moesaic.moe.layer import MoEConfig
from offload_fixtures import decode

pytestmark = pytest.mark.skipif(not mapped.supported(), reason="mapped slots are Linux-only (the copy path runs "
                                                                "elsewhere and is tested in test_offload.py)")


def mappable_lm(seed: int = 0) -> DecoderLM:
    """A tiny LM whose experts are whole pages: w_up [128, 32] and w_down [32, 64] in fp32 (16 and 8 KiB)."""
    torch.manual_seed(seed)
    cfg = DecoderLMConfig(vocab_size=40, d_model=32, num_layers=2, d_ff=64, max_seq_len=32,
                          moe=MoEConfig(d_ff=64, num_experts=8, top_k=2))
    cfg.attention.num_heads = 2
    return DecoderLM(cfg).eval()


@pytest.fixture(scope="module")
def resident():
    return decode(mappable_lm())


def _header(path) -> tuple[bytes, int, dict]:
    """A safetensors file's bytes, where its data starts, and its header."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw, 8 + n, json.loads(raw[8:8 + n])


def _files(store_dir):
    return [store_dir / x["file"] for x in json.loads((store_dir / "manifest.json").read_text())["layers"]]


def test_aligned_file_reads_with_safetensors_and_every_tensor_is_page_aligned(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(1024, generator=g).to(torch.bfloat16),
               "c": torch.arange(7, dtype=torch.int32), "d": torch.randn(2, 3, generator=g).t()}
    write_aligned(tmp_path / "x.safetensors", tensors, {"layer": "L"})
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"layer": "L"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)
        assert all(k.startswith("__pad__.") for k in set(f.keys()) - set(tensors))
    _, data0, header = _header(tmp_path / "x.safetensors")
    assert data0 % mapped.PAGE == 0
    assert all((data0 + header[k]["data_offsets"][0]) % mapped.PAGE == 0 for k in tensors)


@pytest.mark.parametrize("prefetch", ["none", "pregate", "prev"])
def test_mapped_slots_decode_bit_identically(prefetch, resident, tmp_path):
    want_tokens, want_logits = resident
    m = mappable_lm()
    store = DiskStore(save_expert_store(expert_modules(m), tmp_path / "store"))
    expert_bytes = store.spec("model.layers.0.mlp").expert_nbytes
    for cap in (2, 5, 8):
        m = mappable_lm()
        h = offload_experts_(m, store, OffloadConfig(cache_experts=cap, prefetch=prefetch))
        try:
            tokens, logits = decode(m)
        finally:
            h.close()
        assert tokens == want_tokens and torch.equal(logits, want_logits), (cap, prefetch)
        caches = [ex.cache for ex in h.layers.values()]
        assert all(c.mapped for c in caches) and h.cache_bytes() == 0
        t = h.summary()["total"]
        assert t["bytes_read"] == t["loads"] * expert_bytes and t["misses"] > 0
        # the process holds at most the slots' pages of the file (each slot maps one expert)
        assert 0 < store.mapped_bytes() <= len(caches) * cap * expert_bytes
        del h, caches, m
    store.close()


def test_copy_slots_on_request_and_same_result(resident, tmp_path):
    m = mappable_lm()
    store = DiskStore(save_expert_store(expert_modules(m), tmp_path / "store"))
    h = offload_experts_(m, store, OffloadConfig(cache_experts=3, zero_copy=False))
    tokens, logits = decode(m)
    assert not any(ex.cache.mapped for ex in h.layers.values()) and h.cache_bytes() > 0
    assert tokens == resident[0] and torch.equal(logits, resident[1])


def test_mapping_checks_size_and_hash(tmp_path):
    m = mappable_lm()
    d = save_expert_store(expert_modules(m), tmp_path / "store")
    f = _files(d)[0]
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40  # a byte of the last expert of layer 0
    f.write_bytes(bytes(data))
    store = DiskStore(d)
    h = offload_experts_(m, store, OffloadConfig(cache_experts=8))
    with pytest.raises(CheckpointCorruptError, match="expert 7 of model.layers.0.mlp does not match its sha256"):
        for _ in range(4):
            decode(m)
    h.close()
    full = f.stat().st_size
    m2 = mappable_lm()
    store2 = DiskStore(d, verify="none")
    offload_experts_(m2, store2, OffloadConfig(cache_experts=2))
    os.truncate(f, full - 100)  # truncated while open: the next mapping refuses, nothing is read
    with pytest.raises(CheckpointCorruptError, match="changed size since it was opened"):
        decode(m2)


def test_page_cache_bytes_counts_what_was_read(tmp_path):
    d = save_expert_store(expert_modules(mappable_lm()), tmp_path / "store")
    store = DiskStore(d, verify="open")  # hashing the files reads every byte
    total = sum(f.stat().st_size for f in _files(d))
    assert store.page_cache_bytes() >= total - len(_files(d)) * mapped.PAGE  # a partial last page may round down
    store.drop_page_cache()
    assert 0 <= store.page_cache_bytes() <= total + len(_files(d)) * mapped.PAGE


def large_expert_lm(seed: int = 0, backend: str = "auto") -> DecoderLM:
    """One MoE layer whose experts are larger than a huge page and not a multiple of one: w_up [6144, 256]
    (6 MiB) and w_down [256, 3072] (3 MiB, so its slots are padded to 4 MiB)."""
    torch.manual_seed(seed)
    experts = ExpertsConfig.for_kind("glu")
    experts.backend = backend
    cfg = DecoderLMConfig(vocab_size=40, d_model=256, num_layers=1, d_ff=64, max_seq_len=32,
                          moe=MoEConfig(d_ff=3072, num_experts=4, top_k=2, experts=experts))
    cfg.attention.num_heads = 2
    return DecoderLM(cfg).eval()


def test_large_experts_are_huge_page_aligned_in_the_file_and_in_the_slots(tmp_path):
    """Tensors of at least 2 MiB start on a 2 MiB boundary of the store file; each slot of a mapped cache
    starts on one too (a strided buffer where an expert is not a whole number of huge pages), so the slot's
    address and the expert's file offset agree modulo 2 MiB (the kernel can then map the page cache's
    2 MiB folios with one entry each); decoding stays bit-identical for every slot an expert lands in."""
    want_tokens, want_logits = decode(large_expert_lm())
    d = save_expert_store(expert_modules(large_expert_lm()), tmp_path / "store")
    (f,) = _files(d)
    raw, data0, header = _header(f)
    big = [k for k, v in header.items() if k != "__metadata__" and not k.startswith("__pad__")]
    assert len(big) == 8 and data0 % mapped.HUGE == 0
    assert all((data0 + header[k]["data_offsets"][0]) % mapped.HUGE == 0 for k in big)
    with safe_open(str(f), "pt") as sf:
        assert sf.get_tensor("3.w_down_EDF").shape == (256, 3072)
    store = DiskStore(d)
    layer = "model.layers.0.mlp"
    file = store.files[layer]
    for cap, prefetch in ((2, "none"), (3, "pregate")):
        m = large_expert_lm()
        h = offload_experts_(m, store, OffloadConfig(cache_experts=cap, prefetch=prefetch))
        try:
            tokens, logits = decode(m)
            cache = h.layers[layer].cache
            slots = cache.slots
            assert isinstance(slots, mapped.MappedSlots)
            w_down = cache.buffers["w_down_EDF"]
            assert w_down.shape == (cap, 256, 3072) and w_down.stride()[0] == (4 << 20) // 4
            assert all(w_down[s].is_contiguous() for s in range(cap))
            for name in ("w_up_EHD", "w_down_EDF"):
                assert slots.base[name] % mapped.HUGE == 0 and slots.stride[name] % mapped.HUGE == 0
                for s, e in enumerate(cache.expert_at):
                    if e is not None:  # the slot maps the expert's file range: same bytes, congruent address
                        a, b = file.ranges[f"{e}.{name}"]
                        assert (slots.base[name] + s * slots.stride[name] - a) % mapped.HUGE == 0
                        assert bytes(slots.slot_memory(s, name)) == raw[a:b]
            # the part mapped with 2 MiB entries (0 where the file system keeps 4 KiB pages) is part of the map
            assert 0 <= store.mapped_bytes("FilePmdMapped") <= store.mapped_bytes() > 0
        finally:
            h.close()
        assert tokens == want_tokens and torch.equal(logits, want_logits), (cap, prefetch)
    store.close()


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "bmm", "active", "fused"])
def test_strided_slots_compute_every_backend_bit_identically(backend, tmp_path):
    """Every experts backend computes on the strided slot buffers (slots of 4 MiB holding 3 MiB experts) and
    gives the resident model's tokens and logits."""
    want = decode(large_expert_lm(backend=backend))
    m = large_expert_lm(backend=backend)
    store = DiskStore(save_expert_store(expert_modules(m), tmp_path / "store"))
    h = offload_experts_(m, store, OffloadConfig(cache_experts=3))
    try:
        got = decode(m)
        assert h.layers["model.layers.0.mlp"].cache.buffers["w_down_EDF"].stride()[0] == (4 << 20) // 4
    finally:
        h.close()
        store.close()
    assert got[0] == want[0] and torch.equal(got[1], want[1])


def test_huge_alignment_costs_at_most_a_quarter_of_the_data(tmp_path):
    """A 2 MiB boundary is taken only where its gap is at most 1/4 of the tensor: tensors just over 2 MiB stay
    page-aligned (the file does not nearly double), larger ones after them are put on a boundary."""
    mib = 1 << 20
    sizes = [2 * mib + 4096, 2 * mib + 4096, 16 * mib, 3 * mib]  # bytes
    tensors = {f"t{i}": torch.zeros(n // 4) for i, n in enumerate(sizes)}
    write_aligned(tmp_path / "x.safetensors", tensors)
    raw, data0, header = _header(tmp_path / "x.safetensors")
    start = {k: data0 + header[k]["data_offsets"][0] for k in tensors}
    assert start["t0"] % mapped.HUGE == 0  # the data starts on a boundary
    assert start["t1"] % mapped.HUGE != 0 and start["t1"] % mapped.PAGE == 0  # a 2 MiB - 4 KiB gap: not taken
    assert start["t2"] % mapped.HUGE == 0  # a gap under 2 MiB for 16 MiB: taken
    assert start["t3"] % mapped.HUGE == 0  # t2 ends on a boundary: no gap
    data = data0 + sum(sizes)
    assert len(raw) - data <= sum(sizes) // 4 + mapped.HUGE  # padding (the header's included) within the bound
