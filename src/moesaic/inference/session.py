"""Continuous-batching decode over a static KV cache (Orca-style iteration-level scheduling: Yu et al. 2022).

``DecodeSession(model)``; ``add(prompt_ids, params)`` prefills a prompt into a free row (alone, so its
tokens equal decoding it alone) and samples its first token; ``add_batch`` prefills several prompts at
once, left-padded; ``step()`` runs one decode step over every live row and returns the new tokens as
:class:`TokenEvent`\\ s (finish reason ``stop`` on a stop token, ``length`` at ``max_new_tokens``);
``cancel(seq_id)`` frees a row. Rows share one column cursor (see :mod:`moesaic.inference.kv_cache`):
a prompt longer than the cursor shifts the cache right, and a cursor at the end is compacted left.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.errors import ConfigError
from moesaic.core.split_linear import linear_call
from moesaic.inference.decode_plan import DecodePlan
from moesaic.inference.kv_cache import CacheView, StaticKVCache
from moesaic.inference.sampling import SamplingParams, sample_rows


class CapacityError(ConfigError):
    """No free row, or the prompt does not fit next to the live rows now (a server queues and retries)."""


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    seq_id: int
    token_id: int
    finish_reason: str | None = None  # None while the sequence runs; "stop" or "length" on its last token
    logits: Tensor | None = None      # ``[V]`` next-token logits, when the session keeps them (keep_logits)


@dataclasses.dataclass
class _Row:
    seq_id: int
    params: SamplingParams
    generator: torch.Generator | None
    start: int        # first column of the prompt
    length: int       # prompt + generated tokens so far
    prompt_len: int
    last: int = 0     # the token to feed next
    generated: int = 0


#: ``fn(ids_RS, mask_RK or None, positions_RS, cache_view) -> logits of the last position [R, V]``.
StepFn = Callable[[Tensor, "Tensor | None", Tensor, CacheView], Tensor]


def default_step_fn(model: nn.Module) -> StepFn:
    """The forward of one step. For a decoder LM with ``.model`` (the body) and ``.lm_head``, the head runs
    on the last position only and no output object is built; any other model is called as an HF-style LM."""
    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if isinstance(body, nn.Module) and isinstance(head, nn.Module):
        def step(ids: Tensor, mask: Tensor | None, pos: Tensor, view: CacheView) -> Tensor:
            h_RSD = body(ids, mask, pos, view)
            return linear_call(head, h_RSD[:, -1])
        return step

    def step_any(ids: Tensor, mask: Tensor | None, pos: Tensor, view: CacheView) -> Tensor:
        out = model(ids, attention_mask=mask, position_ids=pos, past_key_values=view)
        logits: Tensor = out.logits if hasattr(out, "logits") else out
        return logits[:, -1]
    return step_any


class DecodeSession:
    """Live sequences in up to ``max_batch`` rows of a static cache with ``max_len`` columns (default: twice
    the model's context, enough for any mix of sequences that each fit the context). ``compile=True``
    compiles the step function with ``torch.compile`` (dynamic shapes; eager is the default)."""

    def __init__(self, model: nn.Module, max_batch: int = 8, max_len: int | None = None, *, compile: bool = False,
                 step_fn: StepFn | None = None, keep_logits: bool = False):
        if max_batch < 1:
            raise ConfigError("max_batch", max_batch, "must be >= 1")
        self.model, self.keep_logits = model, keep_logits
        self.context: int | None = getattr(model, "max_seq_len", None)
        cols = max_len or 2 * (self.context or 2048)
        self.cache = StaticKVCache(max_batch, cols)
        p = next(model.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.mask_RC = torch.zeros(max_batch, cols, dtype=torch.bool, device=self.device)
        self.rows: list[_Row | None] = [None] * max_batch
        self.cursor = 0
        self._next_id = 0
        self._pending: list[TokenEvent] = []
        self._shared_gen: torch.Generator | None = None
        fn = step_fn or default_step_fn(model)
        self.step_fn: StepFn = torch.compile(fn, dynamic=True) if compile else fn
        #: batch-1 decode steps of the default step function without the module calls (eager only)
        self.plan = DecodePlan.build(model) if step_fn is None and not compile else None
        self._prefill_fn = fn  # prefill shapes vary with every prompt: compiling them buys nothing

    # ------------------------------------------------------------------ bookkeeping
    @property
    def live(self) -> list[int]:
        return [r.seq_id for r in self.rows if r is not None]

    @property
    def free_rows(self) -> int:
        return sum(r is None for r in self.rows)

    def _n_used(self) -> int:
        return max((i + 1 for i, r in enumerate(self.rows) if r is not None), default=0)

    def _check_prompt(self, ids: Sequence[int], params: SamplingParams) -> None:
        if len(ids) == 0:
            raise ConfigError("prompt", "[]", "must hold at least one token")
        if self.context is not None and len(ids) + params.max_new_tokens > self.context:
            raise ConfigError("max_new_tokens", params.max_new_tokens,
                              f"prompt ({len(ids)} tokens) + new tokens exceeds the context ({self.context})")
        if len(ids) + params.max_new_tokens > self.cache.cols:
            raise ConfigError("max_new_tokens", params.max_new_tokens,
                              f"prompt ({len(ids)} tokens) + new tokens exceeds the cache ({self.cache.cols})")

    def _shift(self, delta: int) -> None:
        """Move every live column by ``delta`` (compaction left, or room on the left for a longer prompt)."""
        L = self.cursor
        if delta == 0 or L == 0:
            self.cursor = max(L + delta, 0)
            return
        src = slice(-delta, L) if delta < 0 else slice(0, L)
        dst = slice(0, L + delta) if delta < 0 else slice(delta, L + delta)
        self.cache.shift(src, delta)
        self.mask_RC[:, dst] = self.mask_RC[:, src].clone()
        self.mask_RC[:, (slice(L + delta, L) if delta < 0 else slice(0, delta))] = False
        for r in self.rows:
            if r is not None:
                r.start += delta
        self.cursor = L + delta

    def _place(self, P: int, params: SamplingParams) -> int:
        """Make room for a prompt of P tokens ending at the cursor; returns its start column."""
        live = [r for r in self.rows if r is not None]
        if not live:
            self.cursor = 0
            self.mask_RC.zero_()
        else:
            self._shift(-min(r.start for r in live))
        cursor = max(self.cursor, P)
        ends = [r.start + (cursor - self.cursor) + r.prompt_len + r.params.max_new_tokens for r in live]
        if max(ends + [cursor + params.max_new_tokens]) > self.cache.cols:
            raise CapacityError("prompt", f"<{P} tokens>", "does not fit next to the live sequences now; retry "
                                "after some finish")
        self._shift(cursor - self.cursor)
        return self.cursor - P

    def _new_row(self, params: SamplingParams, start: int, P: int) -> tuple[int, _Row]:
        if self.free_rows == 0:
            raise CapacityError("max_batch", len(self.rows), "every row is in use; retry after some finish")
        i = self.rows.index(None)
        g = (self._shared_gen if self._shared_gen is not None else
             torch.Generator(device=self.device).manual_seed(params.seed) if params.seed is not None else None)
        row = _Row(self._next_id, params, g, start, P, P)
        self._next_id += 1
        self.rows[i] = row
        self.mask_RC[i] = False
        self.mask_RC[i, start:start + P] = True
        return i, row

    def _accept(self, idx: list[int], logits_RV: Tensor) -> list[TokenEvent]:
        rows = [self.rows[i] for i in idx]
        toks = sample_rows(logits_RV, [r.params for r in rows if r is not None],
                           [r.generator for r in rows if r is not None])
        events: list[TokenEvent] = []
        for i, r, t in zip(idx, rows, toks, strict=True):
            assert r is not None
            r.last, r.generated = t, r.generated + 1
            reason = ("stop" if t in r.params.stop_token_ids else
                      "length" if r.generated >= r.params.max_new_tokens else None)
            events.append(TokenEvent(r.seq_id, t, reason, logits_RV[len(events)] if self.keep_logits else None))
            if reason is not None:
                self.rows[i] = None
        return events

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def add(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> int:
        """Prefill one prompt alone into a free row; its first token is reported by the next :meth:`step`."""
        return self.add_batch([prompt_ids], [params or SamplingParams()])[0]

    @torch.no_grad()
    def add_batch(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                  generator: torch.Generator | None = None) -> list[int]:
        """Prefill several prompts. Into an empty session they go in one forward, left-padded; otherwise one
        at a time (:meth:`add`). ``generator`` (optional) is shared by these rows instead of one per seed."""
        self._shared_gen = generator
        for ids, p in zip(prompts, params, strict=True):
            self._check_prompt(ids, p)
        if self.rows.count(None) < len(prompts):
            raise CapacityError("max_batch", len(self.rows), f"{len(prompts)} prompts do not fit the free rows")
        if any(r is not None for r in self.rows) or len(prompts) == 1:
            return [self._add_one(ids, p) for ids, p in zip(prompts, params, strict=True)]
        P = max(len(ids) for ids in prompts)
        if P + max(p.max_new_tokens for p in params) > self.cache.cols:
            raise CapacityError("prompt", f"<{P} tokens>", f"does not fit the cache ({self.cache.cols} columns)")
        self.cursor, B = 0, len(prompts)
        self.mask_RC.zero_()
        placed = [self._new_row(p, P - len(ids), len(ids)) for ids, p in zip(prompts, params, strict=True)]
        ids_BP = torch.zeros(B, P, dtype=torch.long, device=self.device)
        for b, ids in enumerate(prompts):
            ids_BP[b, P - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        mask = None if all(len(ids) == P for ids in prompts) else self.mask_RC[:B, :P]
        logits = self._prefill_fn(ids_BP, mask, None, self.cache.view(slice(0, B), 0, 0))  # type: ignore[arg-type]
        self.cursor = P
        self._pending += self._accept([i for i, _ in placed], logits)
        return [r.seq_id for _, r in placed]

    def _add_one(self, ids: Sequence[int], params: SamplingParams) -> int:
        P = len(ids)
        start = self._place(P, params)
        i, row = self._new_row(params, start, P)
        logits = self._prefill_fn(torch.tensor([list(ids)], dtype=torch.long, device=self.device), None,
                                  None, self.cache.view(slice(i, i + 1), start, 0))  # type: ignore[arg-type]
        self._pending += self._accept([i], logits)
        return row.seq_id

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """Tokens of the prefills since the last step, then one decode step over every live row."""
        events, self._pending = self._pending, []
        n = self._n_used()
        if n == 0:
            return events
        live = [r for r in self.rows if r is not None]
        if self.cursor >= self.cache.cols:
            self._shift(-min(r.start for r in live))
        L = self.cursor
        idx = [i for i in range(n) if self.rows[i] is not None]
        feed = [[r.last if r is not None else 0] for r in self.rows[:n]]
        pos = [[r.length if r is not None else 0] for r in self.rows[:n]]
        if len(idx) == n:
            self.mask_RC[:n, L] = True  # every row live: one write
        else:
            for i in idx:
                self.mask_RC[i, L] = True
        padded = len(idx) < n or any(r.start > 0 for r in live)
        mask = self.mask_RC[:n, :L + 1] if padded else None
        ids_R1 = torch.tensor(feed, dtype=torch.long, device=self.device)
        pos_R1 = torch.tensor(pos, dtype=torch.long, device=self.device)
        view = self.cache.view(slice(0, n), 0, L)
        plan = self.plan if n == 1 and mask is None else None
        if plan is not None and not plan.applies():
            plan = None
        elif plan is not None and not plan.current():  # a module or weight was replaced since the plan was made
            plan = self.plan = DecodePlan.build(self.model)
        logits_RV = (plan.step(ids_R1, pos_R1, pos[0][0], view) if plan is not None
                     else self.step_fn(ids_R1, mask, pos_R1, view))
        self.cursor = L + 1
        for r in live:
            r.length += 1
        return events + self._accept(idx, logits_RV[idx] if len(idx) < n else logits_RV)

    def cancel(self, seq_id: int) -> bool:
        """Free the row of ``seq_id``; False when it is not live (finished or unknown)."""
        for i, r in enumerate(self.rows):
            if r is not None and r.seq_id == seq_id:
                self.rows[i] = None
                return True
        return False

    def run(self, on_event: Callable[[TokenEvent], Any] | None = None) -> None:
        """Step until no sequence is live, handing every event to ``on_event``."""
        while self.live or self._pending:
            for ev in self.step():
                if on_event is not None:
                    on_event(ev)
