"""A tiny decoder LM with MoE layers for the inference tests (tests/inference/)."""

import torch

from moesaic.models.decoder import DecoderLM, DecoderLMConfig
from moesaic.moe.layer import MoEConfig


def tiny_lm(dtype=torch.float32, seed=0) -> DecoderLM:
    torch.manual_seed(seed)
    cfg = DecoderLMConfig(vocab_size=32, d_model=16, num_layers=2, d_ff=32, max_seq_len=48,
                          moe=MoEConfig(d_ff=32, num_experts=4, top_k=2))
    cfg.attention.num_heads = 2
    return DecoderLM(cfg).to(dtype).eval()
