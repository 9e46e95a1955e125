"""The serving engine: one model, one :class:`~moesaic.inference.DecodeSession`, one worker thread.

Requests (:class:`Job`) wait in a bounded queue (``max_queue``; a full queue refuses new ones with
:class:`QueueFull`, the server's 429) and join the session's rows as rows free up: continuous batching of
decode steps (iteration-level scheduling, Orca: Yu et al. 2022, OSDI), at most ``max_batch`` sequences per
step; ``max_batch=1`` serves them one after another. Each prompt is prefilled alone into its row
(``DecodeSession.add``), so its first token equals decoding it alone; later steps run batched.

Text leaves through :class:`~moesaic.inference.StopTextStream` (stop strings are cut, never streamed), so the
deltas of a job join to exactly the non-streamed text. A job ends with finish reason ``stop`` or ``length``
(OpenAI's meanings), or ``cancelled`` (:meth:`Engine.cancel`: a client that left), ``timeout`` (its
deadline passed), ``shutdown`` or ``error`` (the model raised; the session is rebuilt and the server goes
on). The model runs only on the worker thread; other threads only enqueue, cancel, and read counters.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from moesaic.core.errors import ConfigError
from moesaic.inference.sampling import SamplingParams
from moesaic.inference.session import CapacityError, DecodeSession, TokenEvent
from moesaic.inference.stop import StopTextStream


class QueueFull(Exception):
    """Every row is busy and ``max_queue`` requests wait already (HTTP 429)."""


class ShuttingDown(QueueFull):
    """The server is shutting down and takes no new requests (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class JobEvent:
    """New text of a job (``delta``, possibly empty) and, on its last event, why it ended."""

    delta: str
    finish_reason: str | None = None  # stop, length, cancelled, timeout, shutdown, error
    completion_tokens: int = 0
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    stop: Sequence[str]
    sink: Callable[[JobEvent], None]     # called on the worker thread; must not block
    deadline: float | None = None        # time.monotonic() after which the job ends with "timeout"
    cancel_reason: str | None = None
    seq_id: int | None = None
    tokens: int = 0
    stream: StopTextStream | None = None
    done: bool = False


class Engine:
    """``submit(job)`` from any thread; ``start()``/``stop()`` the worker. ``on_step(rows)`` is called after
    every decode step with the number of rows it ran (metrics)."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_batch: int = 8, max_queue: int = 64,
                 context: int | None = None, on_step: Callable[[int], None] | None = None):
        if max_batch < 1:
            raise ConfigError("max_batch", max_batch, "must be >= 1")
        if max_queue < 0:
            raise ConfigError("max_queue", max_queue, "must be >= 0")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.on_step = on_step
        model_ctx: int | None = getattr(model, "max_seq_len", None)
        if context is not None and (context < 2 or (model_ctx is not None and context > model_ctx)):
            raise ConfigError("context", context, f"must be in [2, the model's context ({model_ctx})]")
        #: tokens per sequence (prompt + completion); the cache holds 2x that per row, so any mix of
        #: sequences that each fit goes in (DecodeSession's shared column cursor).
        self.context = context or model_ctx or 2048
        self.session = self._new_session()
        self._waiting: collections.deque[Job] = collections.deque()
        self._live: dict[int, Job] = {}
        self._cond = threading.Condition()
        self._stopping = self._closing = False
        self._thread: threading.Thread | None = None
        self.errors = 0

    def _new_session(self) -> DecodeSession:
        return DecodeSession(self.model, self.max_batch, 2 * self.context)

    # ------------------------------------------------------------------ any thread
    @property
    def alive(self) -> bool:
        """The worker thread runs (False before ``start`` and after ``stop``)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def running(self) -> int:
        return len(self._live)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="moesaic-serve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End every job (finish reason ``shutdown``) and join the worker."""
        with self._cond:
            self._stopping = True
            for j in list(self._waiting) + list(self._live.values()):
                j.cancel_reason = j.cancel_reason or "shutdown"
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def abort_all(self, reason: str = "shutdown") -> None:
        """End every job now (finish reason ``reason``) and refuse new ones (:class:`ShuttingDown`)."""
        with self._cond:
            self._closing = True
            for j in list(self._waiting) + list(self._live.values()):
                j.cancel_reason = j.cancel_reason or reason
            self._cond.notify_all()

    def submit(self, job: Job) -> None:
        """Queue a job; raises :class:`QueueFull` when ``max_queue`` jobs wait already and no row is free."""
        with self._cond:
            if self._stopping or self._closing:
                raise ShuttingDown("the server is shutting down")
            free = self.max_batch - len(self._live)
            if len(self._waiting) >= self.max_queue + max(free, 0):
                raise QueueFull(f"{len(self._waiting)} requests wait already (queue bound {self.max_queue})")
            job.stream = StopTextStream(self.tokenizer, job.stop)
            self._waiting.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        with self._cond:
            if not job.done and job.cancel_reason is None:
                job.cancel_reason = reason
                self._cond.notify_all()

    # ------------------------------------------------------------------ worker thread
    def _finish(self, job: Job, reason: str, delta: str = "", error: str | None = None) -> None:
        job.done = True
        if job.seq_id is not None:
            self._live.pop(job.seq_id, None)
            self.session.cancel(job.seq_id)
        self._emit(job, JobEvent(delta, reason, job.tokens, error))

    @staticmethod
    def _emit(job: Job, ev: JobEvent) -> None:
        try:
            job.sink(ev)
        except RuntimeError:  # the event loop of a finished request is closed: nobody listens any more
            pass

    def _reap(self) -> None:
        """End cancelled and timed-out jobs, waiting or running."""
        now = time.monotonic()
        with self._cond:
            for j in list(self._waiting) + list(self._live.values()):
                if j.cancel_reason is None and j.deadline is not None and now > j.deadline:
                    j.cancel_reason = "timeout"
            gone = [j for j in self._waiting if j.cancel_reason is not None]
            for j in gone:
                self._waiting.remove(j)
        for j in gone + [j for j in list(self._live.values()) if j.cancel_reason is not None]:
            self._finish(j, j.cancel_reason or "cancelled")

    def _admit(self) -> None:
        while self.session.free_rows:
            with self._cond:
                if not self._waiting:
                    return
                job = self._waiting[0]
            try:
                sid = self.session.add(job.prompt_ids, job.params)
            except CapacityError:
                if self._live:  # it fits once some running sequence finishes
                    return
                self._pop(job)
                self._finish(job, "error", error="the prompt does not fit the cache")
                continue
            except ConfigError as e:
                self._pop(job)
                self._finish(job, "error", error=str(e))
                continue
            self._pop(job)
            job.seq_id = sid
            self._live[sid] = job

    def _pop(self, job: Job) -> None:
        with self._cond:
            if self._waiting and self._waiting[0] is job:
                self._waiting.popleft()

    def _on_token(self, ev: TokenEvent) -> None:
        job = self._live.get(ev.seq_id)
        if job is None or job.done:
            return
        job.tokens += 1
        assert job.stream is not None
        delta, hit = job.stream.push(ev.token_id)
        if ev.finish_reason is not None and not hit:
            delta += job.stream.flush()
        reason = "stop" if hit else ev.finish_reason
        if reason is not None:
            self._finish(job, reason, delta)
        elif delta:
            self._emit(job, JobEvent(delta, None, job.tokens))

    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # grad mode is per thread
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._live):
                    self._cond.wait()
                if self._stopping and not self._waiting and not self._live:
                    return
            try:
                self._reap()
                self._admit()
                if self._live:
                    rows = len(self._live)
                    for ev in self.session.step():
                        self._on_token(ev)
                    if self.on_step is not None:
                        self.on_step(rows)
            except Exception:  # noqa: BLE001 - a model error ends the running jobs, never the server
                self.errors += 1
                traceback.print_exc(file=sys.stderr)
                for j in list(self._live.values()):
                    self._finish(j, "error", error="the model raised during decoding (see the server log)")
                self._live.clear()
                self.session = self._new_session()
