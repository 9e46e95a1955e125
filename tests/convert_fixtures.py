"""Tiny real models for the ``moesaic convert`` tests: a Hugging Face Llama and BERT built from configs and
saved with ``save_pretrained`` (BERT with a word-level ``tokenizer.json``), and a moesaic MoE decoder
checkpoint with a character tokenizer. Every parameter is re-drawn so that a dropped tensor shows."""

from __future__ import annotations

from pathlib import Path

import tokenizers
import torch
import transformers

from moesaic.models.decoder import DecoderLM, DecoderLMConfig
from moesaic.moe.experts.base import ExpertsConfig
from moesaic.moe.layer import MoEConfig
from moesaic.train.tokenizer import CharTokenizer
from moesaic.transforms.convert_io import save_converted

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8
WORDS = sorted(set(TEXT.replace(",", " ").replace(":", " ").replace(".", " ").split()))


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith(("norm.weight", "LayerNorm.weight")) else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def hf_llama(folder: Path, seed: int = 0, **kw) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(**{**dict(
        vocab_size=96, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=32, max_position_embeddings=64, tie_word_embeddings=False), **kw})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    _randomize(model, seed)
    model.eval()
    model.save_pretrained(str(folder))
    return model


def word_tokenizer() -> tokenizers.Tokenizer:
    from tokenizers import models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def hf_bert(folder: Path, seed: int = 0, d_ff: int = 24) -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=d_ff, max_position_embeddings=64, hidden_act="gelu")
    torch.manual_seed(seed)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    _randomize(model, seed)
    model.eval()
    model.save_pretrained(str(folder))
    word_tokenizer().save(str(folder / "tokenizer.json"))
    return model


def moe_checkpoint(folder: Path, seed: int = 0, num_experts: int = 8, shared: int = 0) -> torch.nn.Module:
    """A moesaic MoE decoder (2 layers of ``num_experts`` SwiGLU experts, top-2) saved as a checkpoint."""
    tok = CharTokenizer.train([TEXT])
    moe = MoEConfig(d_ff=16, num_experts=num_experts, top_k=2, experts=ExpertsConfig.for_kind("glu"))
    if shared:
        moe.shared_experts.num = shared
    cfg = DecoderLMConfig(vocab_size=tok.vocab_size, d_model=16, d_ff=32, num_layers=2, moe=moe, max_seq_len=64)
    torch.manual_seed(seed)
    model = DecoderLM(cfg)
    _randomize(model, seed)
    model.tokenizer = tok
    save_converted(model, folder, {})
    return model.eval()
