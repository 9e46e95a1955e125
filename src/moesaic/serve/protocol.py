"""The request bodies of ``moesaic serve`` (OpenAI's completions and chat completions API shape) as pydantic
models, and OpenAI's error shape.

Fields clients send that we ignore (``user``, ``metadata``, ...) are dropped (``extra="ignore"``); fields
whose meaning we do not implement (``n > 1``, ``logprobs``, ``echo``, penalties, ``logit_bias``, tools)
are refused with a 400 naming the field (:meth:`SamplingRequest.unsupported`), never silently ignored.
Types are strict (a string where a number belongs is a 400, not coerced). docs/serve.md.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: torch.Generator.manual_seed accepts [-2**63, 2**64 - 1].
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class APIError(Exception):
    """An HTTP error answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class SamplingRequest(_Strict):
    """The fields completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # OpenAI's default: 1
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    best_of: Any = None
    echo: Any = None
    suffix: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    response_format: Any = None

    def stops(self) -> list[str]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(s) > 4:
            raise APIError(400, f"stop: at most 4 stop strings, got {len(s)}", param="stop")
        return s

    def unsupported(self) -> None:
        """A 400 naming the first field whose value asks for something we do not implement."""
        checks: list[tuple[str, bool, str]] = [
            ("n", self.n not in (None, 1), "only n=1 is supported"),
            ("best_of", self.best_of not in (None, 1), "only best_of=1 is supported"),
            ("logprobs", self.logprobs not in (None, False, 0), "logprobs are not supported"),
            ("top_logprobs", self.top_logprobs not in (None, 0), "top_logprobs are not supported"),
            ("echo", self.echo not in (None, False), "echo is not supported"),
            ("suffix", self.suffix is not None, "suffix (insertion) is not supported"),
            ("presence_penalty", self.presence_penalty not in (None, 0.0), "presence_penalty is not supported"),
            ("frequency_penalty", self.frequency_penalty not in (None, 0.0), "frequency_penalty is not supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
            ("tools", bool(self.tools) or bool(self.functions), "tool calls are not supported"),
            ("tool_choice", self.tool_choice not in (None, "none"), "tool calls are not supported"),
            ("response_format", not _plain_text_format(self.response_format), "only the text response format is "
                                                                             "supported"),
        ]
        for field, bad, why in checks:
            if bad:
                raise APIError(400, f"{field}: {why}", param=field)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _plain_text_format(fmt: Any) -> bool:
    return fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text")


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: ``prompt`` is a string or token ids, or a list of either (not streamed: one
    choice per prompt, prompt i sampling with ``seed + i``)."""

    prompt: str | list[int] | list[str] | list[list[int]]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(SamplingRequest):
    """``POST /v1/chat/completions``; ``max_completion_tokens`` is the newer name of ``max_tokens``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
