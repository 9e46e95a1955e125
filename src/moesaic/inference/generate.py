"""``moesaic.generate`` (tensor in, tensor out; the stable form) and ``moesaic.complete`` (prompts in,
:class:`Completion`\\ s out, with stop strings and streaming), both on :class:`DecodeSession`.

Greedy decoding, temperature, top-k and top-p (nucleus) sampling (Holtzman et al. 2020) with a static KV
cache; batched prompts are prefilled left-padded in one forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.errors import ConfigError
from moesaic.inference.sampling import SamplingParams, check_sampling
from moesaic.inference.session import DecodeSession, TokenEvent
from moesaic.inference.stop import StopTextStream

#: ``on_token(index, token_id, text_delta)``; ``text_delta`` is None without a tokenizer. Returning False
#: cancels that sequence (finish reason ``cancelled``).
OnToken = Callable[[int, int, "str | None"], Any]


@dataclasses.dataclass
class Completion:
    index: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (stop token or string), "length" (max_new_tokens) or "cancelled"

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def _as_id_lists(prompts: Any, tokenizer: Any) -> list[list[int]]:
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if isinstance(prompts, Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ConfigError("prompts", type(prompts).__name__, "must be a string, token ids, or a non-empty list of them")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ConfigError(f"prompts.{i}", p[:40], "is text, but neither tokenizer= nor model.tokenizer is set")
            p = tokenizer.encode(p)
        ids = [int(t) for t in p]
        if not ids:
            raise ConfigError(f"prompts.{i}", "''", "must not be empty")
        out.append(ids)
    return out


@torch.no_grad()
def complete(model: nn.Module, prompts: Any, *, tokenizer: Any = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None,
             on_token: OnToken | None = None, compile: bool = False, max_batch: int | None = None
             ) -> list[Completion]:
    """Complete each prompt (text or token ids); sequence i samples with seed ``seed + i``. More prompts than
    ``max_batch`` (default: all of them) join the batch as rows finish (continuous batching)."""
    check_sampling(max_new_tokens, temperature, top_p, top_k)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if stop and tok is None:
        raise ConfigError("stop", list(stop), "stop strings need a tokenizer (tokenizer= or model.tokenizer)")
    ids = _as_id_lists(prompts, tok)
    if stop_token_ids is None:
        eos = getattr(tok, "eos_id", None)
        stop_token_ids = (eos,) if eos is not None else ()
    params = [SamplingParams(max_new_tokens, temperature, top_p, top_k, None if seed is None else seed + i,
                             tuple(stop_token_ids)) for i in range(len(ids))]
    rows = max_batch or len(ids)
    cols = max(len(p) for p in ids) + max_new_tokens if rows >= len(ids) else None
    was_training = model.training
    model.eval()
    sess = DecodeSession(model, rows, cols, compile=compile)
    streams = [StopTextStream(tok, stop) if tok is not None else None for _ in ids]
    outs: list[list[int]] = [[] for _ in ids]
    reasons: list[str | None] = [None] * len(ids)
    index: dict[int, int] = {}
    todo = list(range(len(ids)))

    def admit() -> None:
        while todo and sess.free_rows:
            take = todo[:sess.free_rows]
            sids = sess.add_batch([ids[i] for i in take], [params[i] for i in take])
            index.update(zip(sids, take, strict=True))
            del todo[:len(take)]

    def handle(ev: TokenEvent) -> None:
        i = index[ev.seq_id]
        if reasons[i] is not None:
            return
        outs[i].append(ev.token_id)
        delta, hit = (None, False)
        s = streams[i]
        if s is not None:
            delta, hit = s.push(ev.token_id)
            if ev.finish_reason is not None and not hit:
                delta = (delta or "") + s.flush()
        reason = "stop" if hit else ev.finish_reason
        if on_token is not None and on_token(i, ev.token_id, delta) is False:
            reason = "cancelled"
        if reason is not None:
            reasons[i] = reason
            sess.cancel(ev.seq_id)

    try:
        admit()
        while sess.live or todo:
            for ev in sess.step():
                handle(ev)
            admit()
        for ev in sess.step():  # the prefill tokens of rows admitted last
            handle(ev)
    finally:
        model.train(was_training)
    return [Completion(i, ids[i], outs[i], streams[i].text if streams[i] is not None else None,  # type: ignore[union-attr]
                       reasons[i] or "length") for i in range(len(ids))]


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, attention_mask: Tensor | None = None, eos_token_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True, *, top_k: int = 0,
             seed: int | None = None, compile: bool = False) -> Tensor:
    """``[B, S + new]``: the (left-padded) prompts followed by the new tokens; rows that stopped at
    ``eos_token_id`` are filled with it. ``generator`` is shared by all rows (else row b uses ``seed + b``)."""
    check_sampling(max_new_tokens, temperature, top_p, top_k)
    if not use_cache:
        from moesaic.models.generation import generate as uncached

        return uncached(model, input_ids, max_new_tokens, temperature, top_p, attention_mask, eos_token_id,
                        generator, False)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    B, S = input_ids.shape
    mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    prompts = [input_ids[b][mask[b]].tolist() for b in range(B)]
    stops = (eos_token_id,) if eos_token_id is not None else ()
    params = [SamplingParams(max_new_tokens, temperature, top_p, top_k, None if seed is None else seed + b, stops)
              for b in range(B)]
    was_training = model.training
    model.eval()
    try:
        sess = DecodeSession(model, B, max(len(p) for p in prompts) + max_new_tokens, compile=compile)
        sids = sess.add_batch(prompts, params, generator=generator)
        row = {s: b for b, s in enumerate(sids)}
        new: list[list[int]] = [[] for _ in range(B)]
        sess.run(lambda ev: new[row[ev.seq_id]].append(ev.token_id))
    finally:
        model.train(was_training)
    n = max(len(t) for t in new)
    fill = eos_token_id if eos_token_id is not None else 0
    new_BN = torch.tensor([t + [fill] * (n - len(t)) for t in new], dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat((input_ids, new_BN), dim=1)
