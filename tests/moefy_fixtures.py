"""Tiny float64 models with dense FFNs for the MoEfication tests: a BERT encoder (GELU, biases) and a
decoder LM (SwiGLU)."""

import torch

from moesaic.train.run_config import load_run_config


def bert():
    data = {"model": {"kind": "bert_encoder", "vocab_size": 50, "d_model": 16, "num_layers": 2, "num_heads": 2,
                      "d_ff": 32, "max_position_embeddings": 16}}
    m = load_run_config(data=data).model.build().double().eval()
    with torch.no_grad():  # BERT initialises biases to 0: give them values so that they are tested
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def llm():
    data = {"model": {"kind": "decoder_lm", "vocab_size": 50, "d_model": 16, "num_layers": 2, "d_ff": 32,
                      "max_seq_len": 16, "attention": {"num_heads": 2}}}
    return load_run_config(data=data).model.build().double().eval()
