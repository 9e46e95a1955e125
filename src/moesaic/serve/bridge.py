"""One request's generation as seen from the event loop: submit a :class:`~moesaic.serve.engine.Job`, read
its events from an ``asyncio.Queue`` that the engine thread fills, cancel it when the client leaves.

Non-streamed requests watch for the ASGI ``http.disconnect`` message while they wait (Starlette does not
cancel a plain handler when its client leaves; its ``is_disconnected()`` poll hung here); streamed ones are
cancelled by Starlette's ``StreamingResponse``, which listens for the disconnect, and
:meth:`Generation.close` runs in the stream's ``finally``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from starlette.requests import Request

from moesaic.inference.sampling import SamplingParams
from moesaic.serve.engine import Engine, Job, JobEvent, QueueFull, ShuttingDown
from moesaic.serve.metrics import ServeMetrics
from moesaic.serve.protocol import APIError

#: finish reasons that are not OpenAI's ``stop``/``length``: the generation was ended from outside.
ABORTED = ("cancelled", "disconnect", "timeout", "shutdown", "error")


class Generation:
    def __init__(self, engine: Engine, metrics: ServeMetrics, endpoint: str, prompt_ids: list[int],
                 params: SamplingParams, stop: Sequence[str], timeout: float | None):
        self.engine, self.metrics, self.endpoint = engine, metrics, endpoint
        self.t0 = time.perf_counter()
        self.first_at: float | None = None
        self.prompt_tokens = len(prompt_ids)
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[JobEvent] = asyncio.Queue()

        def sink(ev: JobEvent) -> None:  # on the engine thread
            if ev.finish_reason is not None:
                self._count(ev)
            loop.call_soon_threadsafe(self.queue.put_nowait, ev)

        deadline = time.monotonic() + timeout if timeout else None
        self.job = Job(list(prompt_ids), params, list(stop), sink, deadline)
        self.final: JobEvent | None = None

    def _count(self, ev: JobEvent) -> None:
        m = self.metrics
        m.prompt_tokens.inc(self.prompt_tokens)
        m.completion_tokens.inc(ev.completion_tokens)
        if ev.finish_reason in ABORTED:
            m.cancelled.labels(ev.finish_reason).inc()

    def submit(self) -> None:
        try:
            self.engine.submit(self.job)
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
        except QueueFull as e:
            self.metrics.rejected.inc()
            raise APIError(429, f"server busy: {e}; retry later", type="rate_limit_error",
                           code="queue_full") from None

    async def events(self, request: Request | None = None) -> AsyncIterator[JobEvent]:
        """The job's events up to its last; with ``request``, watches for a client that leaves (then cancels)."""
        getter: asyncio.Future[JobEvent] | None = None
        watch = asyncio.ensure_future(_disconnected(request)) if request is not None else None
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(self.queue.get())
                await asyncio.wait({getter} | ({watch} if watch is not None else set()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():  # the client left
                    self.close()
                    return
                ev, getter = getter.result(), None
                if self.first_at is None and (ev.delta or ev.finish_reason):
                    self.first_at = time.perf_counter()
                    self.metrics.ttft.labels(self.endpoint).observe(self.first_at - self.t0)
                if ev.finish_reason is not None:
                    self.final = ev
                    self.metrics.latency.labels(self.endpoint).observe(time.perf_counter() - self.t0)
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            for task in (getter, watch):
                if task is not None:
                    task.cancel()

    async def collect(self, request: Request | None) -> tuple[str, JobEvent]:
        """The whole text and the last event; an aborted generation is an :class:`APIError`."""
        parts = [ev.delta async for ev in self.events(request)]
        final = self.final
        if final is None or final.finish_reason in ("cancelled", "disconnect"):
            raise APIError(499, "the client closed the request", code="client_closed")
        raise_aborted(final)
        return "".join(parts), final

    def close(self) -> None:
        """Cancel the job unless it ended (the client left)."""
        if self.final is None:
            self.engine.cancel(self.job, "disconnect")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already: the next ASGI message of
    a plain request is ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def raise_aborted(ev: JobEvent) -> None:
    if ev.finish_reason == "timeout":
        raise APIError(408, "the request timed out (the server's --request-timeout)", type="timeout_error",
                       code="request_timeout")
    if ev.finish_reason == "shutdown":
        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    if ev.finish_reason == "error":
        raise APIError(500, ev.error or "generation failed", type="server_error")
