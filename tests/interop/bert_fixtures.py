"""Tiny random BERT and DistilBERT models built from configs and saved with ``save_pretrained`` (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from .conftest import randomize

VOCAB = 64


def encoder_config(name: str) -> transformers.PretrainedConfig:
    T = transformers
    if name.startswith("bert"):  # eps not 1e-12 so that a dropped eps shows; 3 token types
        c = T.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=24, max_position_embeddings=32, type_vocab_size=3, layer_norm_eps=1e-5,
                         hidden_act="gelu")
    else:  # FFN width == hidden size (square lin1/lin2)
        c = T.DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=16,
                               max_position_embeddings=32, activation="gelu")
    c._attn_implementation = "eager"
    return c


#: name -> transformers class whose checkpoint is imported.
CLASSES = {"bert": "BertModel", "bert_mlm": "BertForMaskedLM", "distilbert": "DistilBertModel",
           "distilbert_mlm": "DistilBertForMaskedLM"}


def build_encoder(name: str, folder: Path, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[name])(encoder_config(name))
    randomize(model, seed)
    with torch.no_grad():  # randomize() keys on "norm.weight"; BERT calls its norms LayerNorm / *_layer_norm
        for n, p in model.named_parameters():
            if n.endswith(("LayerNorm.weight", "layer_norm.weight")):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    model.eval()
    model.save_pretrained(str(folder))
    return model


def base(model: torch.nn.Module) -> torch.nn.Module:
    """The encoder inside a task model (``BertForMaskedLM.bert``)."""
    return getattr(model, "bert", None) or getattr(model, "distilbert", None) or model


def padded_batch(token_types: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    """Three sequences of 11 tokens, two right-padded (attention_mask 0), random token types."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        out["token_type_ids"] = torch.randint(0, 3, (3, 11), generator=g)
    return out
