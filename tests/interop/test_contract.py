"""Contract test of every registered HF architecture (docs/design.md, "Contract tests"): a tiny random
transformers model built from a config and saved with ``save_pretrained`` imports with ``from_hf`` to the
same outputs (decoders: logits, encoders: last hidden state; within 1e-5), and ``to_hf`` under that
architecture writes a checkpoint that transformers loads to the same outputs and that imports back to the
same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moesaic.interop.common import HF_ARCHITECTURES
from moesaic.interop.hf import from_hf, to_hf

from .bert_fixtures import base, build_encoder, encoder_config
from .bert_fixtures import padded_batch as encoder_batch
from .conftest import build_hf, hf_config, padded_batch, transformers

ENCODERS = [n for n in HF_ARCHITECTURES.names() if HF_ARCHITECTURES.get(n).kind != "decoder_lm"]
DECODERS = [n for n in HF_ARCHITECTURES.names() if n not in ENCODERS]


def test_every_architecture_has_a_tiny_fixture() -> None:
    for name in DECODERS:
        assert hf_config(name).model_type == HF_ARCHITECTURES.get(name).model_type
    for name in ENCODERS:
        assert encoder_config(name).model_type == HF_ARCHITECTURES.get(name).model_type


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    s1, s2 = a.state_dict(), b.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("name", ENCODERS)
def test_every_encoder_architecture_imports_and_exports_exactly(name: str, tmp_path: Path) -> None:
    ref = base(build_encoder(name, tmp_path / "hf"))
    model = from_hf(tmp_path / "hf")
    batch = encoder_batch(token_types=name == "bert")
    with torch.no_grad():
        want = ref(**batch).last_hidden_state
        torch.testing.assert_close(model(**batch).last_hidden_state, want, atol=1e-5, rtol=0)
    to_hf(model, tmp_path / "out", arch=name)
    back = transformers.AutoModel.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).last_hidden_state, want, atol=1e-5, rtol=0)
    _same_weights(model, from_hf(tmp_path / "out"))


@pytest.mark.parametrize("name", DECODERS)
def test_every_architecture_imports_and_exports_exactly(name: str, tmp_path: Path) -> None:
    ref = build_hf(name, tmp_path / "hf")
    model = from_hf(tmp_path / "hf")
    ids, mask = padded_batch()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, position_ids=pos).logits
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)

    to_hf(model, tmp_path / "out", arch=name)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    with torch.no_grad():
        again = back.eval()(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(again[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)
    model2 = from_hf(tmp_path / "out")
    assert model2.cfg == model.cfg
    _same_weights(model, model2)
