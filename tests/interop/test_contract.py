"""Contract test of every registered HF architecture (docs/design.md, "Contract tests"): a tiny random
transformers model built from a config and saved with ``save_pretrained`` imports with ``from_hf`` to the
same logits (1e-5), and ``to_hf`` under that architecture writes a checkpoint that transformers loads to
the same logits and that imports back to the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moesaic.core.registry import HF_ARCHITECTURES
from moesaic.interop.hf import from_hf, to_hf

from .conftest import build_hf, hf_config, padded_batch, transformers


def test_every_architecture_has_a_tiny_fixture() -> None:
    for name in HF_ARCHITECTURES.names():
        assert hf_config(name).model_type == HF_ARCHITECTURES.get(name).model_type


@pytest.mark.parametrize("name", HF_ARCHITECTURES.names())
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
    s1, s2 = model.state_dict(), model2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
