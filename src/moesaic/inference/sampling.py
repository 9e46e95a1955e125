"""Per-sequence sampling settings and the next-token choice: greedy, temperature, top-k and top-p (nucleus
sampling, Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration").

Each sequence samples with its own ``torch.Generator`` (seeded from ``seed``), so a sequence's tokens do
not depend on which other sequences share its batch: seeded sampling reproduces alone, batched, and under
continuous batching.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from moesaic.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` switch those filters off.
    ``seed`` None draws from torch's global generator (not reproducible unless it is seeded);
    ``stop_token_ids`` end the sequence with finish reason ``stop`` (the token is kept)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_sampling(self.max_new_tokens, self.temperature, self.top_p, self.top_k)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    """Typed errors for bad sampling options (the CLI turns them into one line)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError("max_new_tokens", max_new_tokens, "must be an integer >= 1")
    if not (temperature >= 0.0 and math.isfinite(temperature)):
        raise ConfigError("temperature", temperature, "must be a finite number >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError("top_p", top_p, "must be in (0, 1]")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError("top_k", top_k, "must be an integer >= 0 (0 = no top-k filter)")


def filtered_probs(logits_V: Tensor, temperature: float, top_p: float, top_k: int) -> Tensor:
    """Probabilities ``[V]`` after temperature, top-k (keep the k largest) and top-p (the smallest set whose
    mass reaches ``top_p``, at least one token)."""
    logits_V = logits_V.float() / temperature
    if 0 < top_k < logits_V.shape[-1]:
        kth = logits_V.topk(top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    if top_p < 1.0:
        p_sorted, idx = probs_V.sort(descending=True, stable=True)
        drop = (p_sorted.cumsum(-1) - p_sorted) >= top_p  # the mass before this token already reaches top_p
        probs_V = torch.zeros_like(probs_V).scatter(-1, idx, p_sorted.masked_fill(drop, 0.0))
    return probs_V


def sample_rows(logits_RV: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
                ) -> list[int]:
    """One next token per row: rows with ``temperature == 0`` take the argmax (one batched op); the others
    sample from :func:`filtered_probs` with their own generator."""
    out = logits_RV.argmax(-1).tolist()
    for r, (p, g) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            probs_V = filtered_probs(logits_RV[r], p.temperature, p.top_p, p.top_k)
            out[r] = int(torch.multinomial(probs_V, 1, generator=g))
    return out
