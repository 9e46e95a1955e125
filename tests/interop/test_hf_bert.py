"""BERT-family encoders: ``from_hf`` gives transformers' ``last_hidden_state`` (padding included) and
pooler output, ``to_hf`` writes a folder that ``AutoModel`` loads with the same outputs, and bad inputs
raise typed errors naming the field or tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from moesaic.core.errors import ConfigError, ConversionError
from moesaic.interop.hf import from_hf, to_hf
from moesaic.models.bert import BertEncoder

from .bert_fixtures import CLASSES, base, build_encoder, padded_batch

TOL = 1e-5


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            cache[name] = (folder, build_encoder(name, folder))
        return cache[name]

    return get


def _outputs(model, batch):
    with torch.no_grad():
        return model(**batch)


@pytest.mark.parametrize("name", list(CLASSES))
def test_last_hidden_state_matches_transformers(encoders, name):
    folder, hf = encoders(name)
    model = from_hf(folder)
    assert isinstance(model, BertEncoder) and model.hf_info["arch"] == name.split("_")[0]
    batch = padded_batch(token_types=name.startswith("bert"))
    want, got = _outputs(base(hf), batch), _outputs(model, batch)
    assert got.last_hidden_state.shape == want.last_hidden_state.shape
    err = (got.last_hidden_state - want.last_hidden_state).abs().max().item()
    assert err < TOL, err
    if name == "bert":  # BertModel saves its pooler; the import keeps it
        assert (got.pooler_output - want.pooler_output).abs().max().item() < TOL
    else:
        assert got.pooler_output is None
    if name.endswith("mlm"):
        assert model.hf_info["ignored"], "the MLM head is listed as ignored"


def test_padding_does_not_change_real_positions(encoders):
    folder, _ = encoders("bert")
    model = from_hf(folder)
    batch = padded_batch(token_types=True)
    full = _outputs(model, batch).last_hidden_state
    n = int(batch["attention_mask"][1].sum())
    alone = _outputs(model, {k: v[1:2, :n] for k, v in batch.items()}).last_hidden_state
    assert (full[1, :n] - alone[0]).abs().max().item() < TOL


def test_from_loaded_transformers_model(encoders):
    _, hf = encoders("bert_mlm")
    model = from_hf(hf)
    batch = padded_batch(token_types=True)
    err = (_outputs(model, batch).last_hidden_state - _outputs(base(hf), batch).last_hidden_state).abs().max()
    assert err.item() < TOL and model.hf_info["source"] is None


@pytest.mark.parametrize("name", list(CLASSES))
def test_round_trip(encoders, name, tmp_path):
    folder, hf = encoders(name)
    model = from_hf(folder)
    hf_cfg = to_hf(model, tmp_path / "out")
    assert hf_cfg.model_type == name.split("_")[0]
    kw = {"add_pooling_layer": False} if name == "bert_mlm" else {}
    back = transformers.AutoModel.from_pretrained(str(tmp_path / "out"), attn_implementation="eager", **kw).eval()
    batch = padded_batch(token_types=name.startswith("bert"))
    want, got = _outputs(base(hf), batch), _outputs(back, batch)
    assert (got.last_hidden_state - want.last_hidden_state).abs().max().item() < TOL
    if name == "bert":
        assert (got.pooler_output - want.pooler_output).abs().max().item() < TOL
    again = from_hf(tmp_path / "out")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_decoders_still_import_as_causal_lm(hf_models):
    from moesaic.models.decoder import DecoderLM

    folder, _ = hf_models("llama")
    assert isinstance(from_hf(folder), DecoderLM)


def test_export_refuses_an_architecture_that_cannot_hold_the_model(encoders, tmp_path):
    model = from_hf(encoders("bert")[0])
    with pytest.raises(ConversionError, match="distilbert lacks token type embeddings"):
        to_hf(model, tmp_path / "x", arch="distilbert")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ errors

@pytest.fixture
def bert_copy(encoders, tmp_path):
    src, _ = encoders("bert")
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unsupported_model_type(bert_copy):
    _edit_config(bert_copy, model_type="roberta", architectures=["RobertaModel"])
    with pytest.raises(ConversionError, match="unsupported model_type 'roberta'; supported: .*bert.*distilbert"):
        from_hf(bert_copy)


@pytest.mark.parametrize("field,value", [("vocab_size", 70), ("hidden_size", 32), ("intermediate_size", 20),
                                         ("max_position_embeddings", 40), ("type_vocab_size", 2),
                                         ("num_hidden_layers", 3)])
def test_config_that_does_not_match_the_weights_names_the_field(bert_copy, field, value):
    _edit_config(bert_copy, **{field: value})
    with pytest.raises(ConversionError, match=f"config field {field} = {value} but"):
        from_hf(bert_copy)


def test_head_count_that_does_not_divide_the_width(bert_copy):
    _edit_config(bert_copy, num_attention_heads=5)
    with pytest.raises(ConversionError, match="config field num_attention_heads = 5 .*must divide hidden_size"):
        from_hf(bert_copy)


def test_missing_weights_file(bert_copy):
    (bert_copy / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="no model.safetensors"):
        from_hf(bert_copy)


def test_missing_tensor_is_named(bert_copy):
    f = bert_copy / "model.safetensors"
    state = load_file(str(f))
    del state["encoder.layer.1.output.dense.bias"]
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing tensors \(1\): encoder\.layer\.1\.output\.dense\.bias"):
        from_hf(bert_copy)


@pytest.mark.parametrize("changes,field", [({"position_embedding_type": "relative_key"}, "position_embedding_type"),
                                           ({"is_decoder": True}, "is_decoder"),
                                           ({"hidden_act": "mish"}, "hidden_act")])
def test_features_moesaic_cannot_express_are_refused_by_name(bert_copy, changes, field):
    _edit_config(bert_copy, **changes)
    with pytest.raises(ConversionError, match=f"config field {field}"):
        from_hf(bert_copy)


def test_token_types_on_a_distilbert_model_are_refused(encoders):
    model = from_hf(encoders("distilbert")[0])
    batch = padded_batch(token_types=True)
    with pytest.raises(ConfigError, match="token_type_ids: this model has no token type embeddings"):
        model(**batch)


def test_cli_import_export_of_an_encoder(encoders, tmp_path):
    import moesaic
    from moesaic.cli import main

    folder, hf = encoders("bert")
    assert main(["convert", "hf-import", str(folder), str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "hf-export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    batch = padded_batch(token_types=True)
    want = _outputs(base(hf), batch).last_hidden_state
    loaded = moesaic.load(tmp_path / "ckpt")
    back = transformers.AutoModel.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
    for model in (loaded, back):
        assert (_outputs(model, batch).last_hidden_state - want).abs().max().item() < TOL
