"""The demo-shaped tiny LM of tests/lm_fixtures.py with E experts, and a decode run, for the offload tests."""

import copy

import torch

from lm_fixtures import TINY
from moesaic.inference import DecodeSession, SamplingParams
from moesaic.models.decoder import DecoderLM, DecoderLMConfig
from moesaic.moe.experts.base import ExpertsConfig
from moesaic.moe.layer import MoEConfig

PROMPTS = [[5, 9, 2, 7, 1, 3, 3, 8, 2, 4, 11, 3, 3, 8], [3, 1, 4]]


def demo_lm(num_experts: int = 8, backend: str = "auto", seed: int = 0) -> DecoderLM:
    """The tiny Shakespeare LM of tests/lm_fixtures.py (d_model 16, 2 layers, k = 2), ``num_experts`` experts."""
    m = copy.deepcopy(TINY["model"])
    torch.manual_seed(seed)
    experts = ExpertsConfig.for_kind("glu")
    experts.backend = backend
    cfg = DecoderLMConfig(vocab_size=40, d_model=m["d_model"], num_layers=m["num_layers"], d_ff=m["d_ff"],
                          max_seq_len=m["max_seq_len"],
                          moe=MoEConfig(d_ff=m["moe"]["d_ff"], num_experts=num_experts, top_k=m["moe"]["top_k"],
                                        experts=experts))
    cfg.attention.num_heads = m["attention"]["num_heads"]
    return DecoderLM(cfg).eval()


def decode(model, prompts: list[list[int]] = PROMPTS) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and every step's logits of ``prompts`` decoded together (two by default: a left-padded
    prefill, the ``fused`` backend; decode steps of two tokens, ``active``; one prompt: one-token steps)."""
    sess = DecodeSession(model, len(prompts), keep_logits=True)
    sess.add_batch(prompts, [SamplingParams(max_new_tokens=10)] * len(prompts))
    evs: list = []
    sess.run(evs.append)
    return [e.token_id for e in evs], torch.stack([e.logits for e in evs])
