"""Autoregressive sampling with a KV cache: greedy, temperature and top-p (nucleus, Holtzman et al. 2020)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moesaic.core.errors import ConfigError
from moesaic.models.cache import KVCache


def sample_next(logits_BV: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Next token ids ``[B]``: argmax when ``temperature == 0``; else sample from the smallest set of tokens
    whose probability reaches ``top_p`` (at least one token), at the given temperature."""
    if temperature == 0.0:
        return logits_BV.argmax(-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        p_sorted, idx = probs_BV.sort(dim=-1, descending=True, stable=True)
        drop = (p_sorted.cumsum(-1) - p_sorted) >= top_p  # mass before this token already reaches top_p
        p_sorted = p_sorted.masked_fill(drop, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, idx, p_sorted)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, attention_mask: Tensor | None = None, eos_token_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> Tensor:
    if temperature < 0 or temperature != temperature:
        raise ConfigError("temperature", temperature, "must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError("top_p", top_p, "must be in (0, 1]")
    max_len = getattr(model, "max_seq_len", None)
    if max_len is not None and input_ids.shape[1] + max_new_tokens > max_len:
        raise ConfigError("max_new_tokens", max_new_tokens,
                          f"prompt ({input_ids.shape[1]} tokens) + new tokens exceeds the context ({max_len})")
    was_training = model.training
    model.eval()
    out = input_ids
    mask = attention_mask.bool() if attention_mask is not None else None
    cache = KVCache() if use_cache else None
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    step_ids = input_ids
    try:
        for _ in range(max_new_tokens):
            if cache is not None:
                logits = model(step_ids, attention_mask=mask, past_key_values=cache).logits
            else:
                logits = model(out, attention_mask=mask).logits
            nxt = sample_next(logits[:, -1], temperature, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out = torch.cat((out, nxt[:, None]), dim=1)
            step_ids = nxt[:, None]
            if mask is not None:
                mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)
    return out
