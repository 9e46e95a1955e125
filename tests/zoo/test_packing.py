"""Padding-free batches equal the padded batch (fp32, 1e-6) for the decoder and the encoder with dropless
token-choice routers; pack/unpack and the packed labels."""

from __future__ import annotations

import pytest
import torch

from moesaic.train.packing import pack, unpack
from moesaic.train.run_config import load_run_config

SEQS = [[5, 7, 9, 11, 13], [2, 4, 6, 8, 10, 12, 14, 16, 18], [21, 22, 23]]


def _model(kind: str, router: str) -> torch.nn.Module:
    model = {"kind": kind, "vocab_size": 32, "d_model": 16, "num_layers": 2, "d_ff": 32, "max_seq_len": 32,
             "attention": {"num_heads": 2},
             "moe": {"d_ff": 16, "num_experts": 4, "top_k": 1 if router == "switch" else 2, "router": {"kind": router}}}
    if kind == "encoder_classifier":
        model["num_labels"] = 3
    torch.manual_seed(0)
    return load_run_config(data={"model": model}).model.build().eval()


def _padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    M = max(map(len, seqs))
    ids = torch.zeros(len(seqs), M, dtype=torch.long)
    mask = torch.zeros(len(seqs), M, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids, mask


def test_pack_unpack_and_labels() -> None:
    b = pack(SEQS, row_len=10)
    assert b["input_ids"].shape == (2, 10) and "attention_mask" in b  # first fit: sequences 0 and 2 share row 0
    assert b["seq_ids"][0].tolist() == [0] * 5 + [2] * 3 + [-1] * 2 and b["seq_ids"][1].tolist() == [1] * 9 + [-1]
    one = pack(SEQS)
    assert one["input_ids"].shape == (1, 17) and "attention_mask" not in one
    assert one["labels"][0, :5].tolist() == [7, 9, 11, 13, -100]
    parts = unpack(one["input_ids"], one["seq_ids"])
    assert [p.tolist() for p in parts] == SEQS
    with pytest.raises(Exception, match="row_len"):
        pack(SEQS, row_len=4)


@pytest.mark.parametrize("router", ["topk", "switch", "top_p"])
@pytest.mark.parametrize("row_len", [None, 10])
def test_decoder_packed_equals_padded(router: str, row_len: int | None) -> None:
    model = _model("decoder_lm", router)
    ids, mask = _padded(SEQS)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        b = pack(SEQS, row_len)
        out = model(b["input_ids"], attention_mask=b.get("attention_mask"), seq_ids=b["seq_ids"]).logits
    for i, got in enumerate(unpack(out, b["seq_ids"], len(SEQS))):
        torch.testing.assert_close(got, ref[i, :len(SEQS[i])], atol=1e-6, rtol=0)


def test_encoder_packed_equals_padded() -> None:
    model = _model("encoder_classifier", "topk")
    ids, mask = _padded(SEQS)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        b = pack(SEQS)
        out = model(b["input_ids"], seq_ids=b["seq_ids"])
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=0)
    for i, got in enumerate(unpack(out.hidden_states, b["seq_ids"])):
        torch.testing.assert_close(got, ref.hidden_states[i, :len(SEQS[i])], atol=1e-6, rtol=0)
