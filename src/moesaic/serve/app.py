"""The FastAPI application of ``moesaic serve``: OpenAI's ``/v1/completions``, ``/v1/chat/completions`` (both
with ``stream: true`` as server-sent events ending in ``data: [DONE]``), ``/v1/models``, plus ``/health``
and ``/metrics``. Response and error shapes follow OpenAI's API reference; docs/serve.md lists every field.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from moesaic.inference.sampling import SamplingParams
from moesaic.serve.bridge import ABORTED, Generation
from moesaic.serve.chat import ChatFormatter
from moesaic.serve.engine import Engine, JobEvent
from moesaic.serve.guard import Guard
from moesaic.serve.metrics import ServeMetrics
from moesaic.serve.protocol import (
    SEED_MAX,
    SEED_MIN,
    APIError,
    ChatRequest,
    CompletionRequest,
    SamplingRequest,
    error_body,
)


@dataclasses.dataclass
class ServeConfig:
    model_name: str = "moesaic"
    api_key: str | None = None
    body_limit: int = 1 << 20          # bytes (413 past it)
    request_timeout: float | None = 600.0  # seconds from arrival to the last token (408 past it)
    default_max_tokens: int | None = None  # None: up to the model's context


class State:
    """What the handlers share: the engine, the tokenizer, the chat formatter, the metrics, the config."""

    def __init__(self, engine: Engine, tokenizer: Any, chat: ChatFormatter, metrics: ServeMetrics, cfg: ServeConfig):
        self.engine, self.tokenizer, self.chat, self.metrics, self.cfg = engine, tokenizer, chat, metrics, cfg
        self.created = int(time.time())
        cfg_model = getattr(engine.model, "cfg", None)
        sizes = [v for v in (getattr(cfg_model, "vocab_size", None), getattr(tokenizer, "vocab_size", None)) if v]
        self.vocab = min(sizes) if sizes else None

    def check_model(self, name: str) -> None:
        if name != self.cfg.model_name:
            raise APIError(404, f"model '{name[:100]}' does not exist; this server serves '{self.cfg.model_name}'",
                           param="model", code="model_not_found")

    def encode(self, text: str, field: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800" is valid JSON but no text
            raise APIError(400, f"{field}: holds a lone UTF-16 surrogate (not text)", param=field) from None
        ids = [int(t) for t in self.tokenizer.encode(text)]
        if not ids:
            raise APIError(400, f"{field}: must not be empty", param=field)
        return ids

    def prompt_lists(self, prompt: str | list[int] | list[str] | list[list[int]]) -> list[list[int]]:
        """The prompts of a completion request: a string or token ids, or a list of either."""
        many: list[Any] = (list(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
                           else [prompt])
        return [self._prompt_ids(p, "prompt" if len(many) == 1 else f"prompt.{i}") for i, p in enumerate(many)]

    def _prompt_ids(self, one: Any, field: str) -> list[int]:
        if isinstance(one, str):
            return self.encode(one, field)
        ids = [int(t) for t in one]
        if not ids:
            raise APIError(400, f"{field}: must not be empty", param=field)
        if self.vocab is not None and not all(0 <= t < self.vocab for t in ids):
            raise APIError(400, f"{field}: token ids must be in [0, {self.vocab})", param=field)
        return ids

    def sampling(self, body: SamplingRequest, n_prompt: int, max_tokens: int | None, field: str,
                 seed_offset: int = 0) -> SamplingParams:
        body.unsupported()
        ctx = self.engine.context
        if ctx is not None and n_prompt >= ctx:
            raise APIError(400, f"{field}: {n_prompt} tokens, the served context is {ctx}", param=field,
                           code="context_length_exceeded")
        room = (ctx - n_prompt) if ctx is not None else None
        max_name = "max_completion_tokens" if isinstance(body, ChatRequest) and body.max_completion_tokens else \
            "max_tokens"
        if max_tokens is None:
            max_tokens = min(v for v in (room, self.cfg.default_max_tokens, 1 << 20) if v is not None)
        elif room is not None and max_tokens > room:
            raise APIError(400, f"{max_name}: the prompt ({n_prompt} tokens) + {max_name} ({max_tokens}) exceeds the "
                           f"served context ({ctx} tokens)", param=max_name, code="context_length_exceeded")
        eos = getattr(self.tokenizer, "eos_id", None)
        temperature = 1.0 if body.temperature is None else body.temperature
        seed = body.seed
        if seed is not None:  # prompt i of a list samples with seed + i, wrapped into the generator's range
            seed = (seed + seed_offset - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN
        return SamplingParams(max_tokens, temperature, 1.0 if body.top_p is None else body.top_p, 0,
                              seed, (eos,) if eos is not None else ())

    def generation(self, endpoint: str, ids: list[int], params: SamplingParams, body: SamplingRequest) -> Generation:
        gen = Generation(self.engine, self.metrics, endpoint, ids, params, body.stops(), self.cfg.request_timeout)
        gen.submit()
        return gen


def _json(body: dict[str, Any], status: int = 200) -> Response:
    """JSON with non-ASCII escaped: a lone surrogate echoed from a request cannot break the encoding."""
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _stream(gen: Generation, body: SamplingRequest, chunk: Callable[[str, str | None], dict[str, Any]],
            head: dict[str, Any] | None) -> StreamingResponse:
    """Server-sent events: ``head`` (chat's role chunk), one chunk per text delta, a chunk with the finish
    reason, the usage chunk when ``stream_options.include_usage``, then ``data: [DONE]``."""
    usage_field = body.include_usage

    def with_usage(c: dict[str, Any]) -> dict[str, Any]:
        return {**c, "usage": None} if usage_field else c

    async def events() -> AsyncIterator[str]:
        try:
            if head is not None:
                yield _sse(with_usage(head))
            async for ev in gen.events():
                if ev.delta:
                    yield _sse(with_usage(chunk(ev.delta, None)))
                if ev.finish_reason in ABORTED:
                    err = APIError(500, ev.error or ev.finish_reason or "aborted", type="server_error",
                                   code=ev.finish_reason)
                    yield _sse(err.body())
                    break
                if ev.finish_reason is not None:
                    yield _sse(with_usage(chunk("", ev.finish_reason)))
                    if usage_field:
                        yield _sse({**chunk("", None), "choices": [],
                                    "usage": _usage(gen.prompt_tokens, ev.completion_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            gen.close()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


def create_app(engine: Engine, tokenizer: Any, chat: ChatFormatter, cfg: ServeConfig,
               metrics: ServeMetrics | None = None, on_ready: Callable[[], None] | None = None) -> ASGIApp:
    """The application; its lifespan starts the engine (then calls ``on_ready``) and stops it at shutdown."""
    metrics = metrics or ServeMetrics(engine.model)
    st = State(engine, tokenizer, chat, metrics, cfg)
    metrics.running.set_function(lambda: engine.running)
    metrics.waiting.set_function(lambda: engine.waiting)
    engine.on_step = metrics.step_rows.observe

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        if on_ready is not None:
            on_ready()
        yield
        engine.stop()

    app = FastAPI(title="moesaic serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = st

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        return _json(e.body(), e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
        return _json(error_body(msg, "invalid_request_error", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error ({type(e).__name__})", "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        ok = engine.alive
        return _json({"status": "ok" if ok else "unavailable", "model": cfg.model_name, "running": engine.running,
                      "waiting": engine.waiting}, 200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    def model_card() -> dict[str, Any]:
        return {"id": cfg.model_name, "object": "model", "created": st.created, "owned_by": "moesaic"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        st.check_model(name)
        return model_card()

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        st.check_model(body.model)
        prompts = st.prompt_lists(body.prompt)
        if body.stream and len(prompts) > 1:
            raise APIError(400, f"prompt: a stream takes one prompt, got {len(prompts)} (send them without stream)",
                           param="prompt")
        params = [st.sampling(body, len(ids), body.max_tokens, "prompt" if len(prompts) == 1 else f"prompt.{i}", i)
                  for i, ids in enumerate(prompts)]
        gens: list[Generation] = []
        try:
            for ids, p in zip(prompts, params, strict=True):
                gens.append(st.generation("/v1/completions", ids, p, body))
        except APIError:  # the queue took only some: none of them runs
            for g in gens:
                g.close()
            raise
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, reason: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}

        if body.stream:
            return _stream(gens[0], body, chunk, None)

        async def watched() -> tuple[str, JobEvent]:  # the first prompt watches the client for all of them
            try:
                return await gens[0].collect(request)
            except APIError:
                for g in gens:
                    g.close()
                raise

        results = await asyncio.gather(watched(), *(g.collect(None) for g in gens[1:]), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        done = [r for r in results if not isinstance(r, BaseException)]
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": final.finish_reason}
                   for i, (text, final) in enumerate(done)]
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name,
                             "choices": choices, "usage": _usage(sum(map(len, prompts)),
                                                                 sum(f.completion_tokens for _, f in done))})

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        st.check_model(body.model)
        ids = st.encode(st.chat.format([(m.role, m.text()) for m in body.messages]), "messages")
        gen = st.generation("/v1/chat/completions", ids, st.sampling(body, len(ids), body.new_tokens(), "messages"),
                            body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, reason: str | None) -> dict[str, Any]:
            delta = {"content": text} if reason is None else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        if body.stream:
            head = chunk("", None)
            head["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return _stream(gen, body, chunk, head)
        text, final = await gen.collect(request)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "logprobs": None, "finish_reason": final.finish_reason}],
                             "usage": _usage(len(ids), final.completion_tokens)})

    guard = Guard(app, api_key=cfg.api_key, body_limit=cfg.body_limit, metrics=metrics)
    guard.begin_shutdown = engine.abort_all  # called by the server when the shutdown grace runs out
    return guard
