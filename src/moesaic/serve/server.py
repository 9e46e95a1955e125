"""Building and running ``moesaic serve``: :func:`build_app` (model -> ASGI application), :func:`run_server`
(uvicorn on a socket we bind first, so ``port=0`` works and the bound port is announced on one line), and
:func:`launch` (start the CLI server as a subprocess from a script or test and get its URL).

SIGTERM and SIGINT stop the server gracefully: it stops accepting connections, lets running requests
finish for up to ``shutdown_grace`` seconds, then ends the rest (a stream gets an error event with code
``shutdown`` and ``data: [DONE]``, a plain request a 503), stops the engine, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from starlette.types import ASGIApp
from torch import nn

from moesaic.core.errors import ConfigError
from moesaic.serve.app import ServeConfig, create_app
from moesaic.serve.chat import ChatFormatter
from moesaic.serve.engine import Engine
from moesaic.serve.metrics import ServeMetrics

#: The line ``moesaic serve`` prints on stdout once it accepts requests; scripts read the port from it.
READY_LINE = "moesaic serve: listening on http://{host}:{port}"
#: Tokens per sequence unless ``--context`` says otherwise: the KV cache is allocated up front for
#: ``max_batch`` rows of twice this, so a model's full context (32k and more) would be gigabytes.
DEFAULT_CONTEXT = 4096
READY_RE = re.compile(r"^moesaic serve: listening on (http://\S+):(\d+)")


def build_app(model: nn.Module, cfg: ServeConfig, *, tokenizer: Any = None, chat_template: str | None = None,
              max_batch: int = 8, max_queue: int = 64, context: int | None = None,
              on_ready: Callable[[], None] | None = None) -> ASGIApp:
    """The ASGI application serving ``model`` (its ``.tokenizer`` unless ``tokenizer`` is given)."""
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ConfigError("tokenizer", None, "the model has no tokenizer; the server needs one to read and write text")
    if context is None:
        model_ctx = getattr(model, "max_seq_len", None)
        context = min(model_ctx, DEFAULT_CONTEXT) if model_ctx else DEFAULT_CONTEXT
    engine = Engine(model, tok, max_batch=max_batch, max_queue=max_queue, context=context)
    special = getattr(tok, "decode", None)
    eos = getattr(tok, "eos_id", None)
    chat = ChatFormatter(chat_template, eos_token=special([eos]) if special is not None and eos is not None else "")
    return create_app(engine, tok, chat, cfg, ServeMetrics(model), on_ready=on_ready)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (``port=0``: a free port)."""
    if not 0 <= port <= 65535:
        raise ConfigError("--port", port, "must be in [0, 65535]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError("--port", port, f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(2048)  # before the app starts: early clients wait in the backlog instead of being refused
    return sock


def _uvicorn_server(app: ASGIApp, shutdown_grace: float) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises a caught SIGTERM after a graceful shutdown (the process then dies of it);
            # we have shut down cleanly and exit 0 instead.
            with super().capture_signals():
                yield
                self._captured_signals.clear()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # uvicorn stops accepting and waits for running requests; when the grace runs out the engine
            # ends what still runs (streams get an error event and [DONE], plain requests a 503), so
            # clients see a complete response rather than a cut connection.
            hook = getattr(app, "begin_shutdown", None)
            if hook is not None:
                asyncio.get_running_loop().call_later(shutdown_grace, hook)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(shutdown_grace) + 5)  # a backstop behind the hook
    return Server(config)


def run_server(make_app: Callable[[Callable[[], None]], ASGIApp], host: str = "127.0.0.1", port: int = 8000,
               shutdown_grace: float = 30.0, out: IO[str] | None = None) -> None:
    """Bind, build the app with an ``on_ready`` that prints :data:`READY_LINE`, serve until SIGTERM/SIGINT."""
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    stream = out or sys.stdout

    def ready() -> None:
        print(READY_LINE.format(host=f"[{host}]" if ":" in host else host, port=bound), file=stream, flush=True)

    server = _uvicorn_server(make_app(ready), shutdown_grace)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


@contextlib.contextmanager
def serve_in_thread(app: ASGIApp, host: str = "127.0.0.1") -> Iterator[str]:
    """Run ``app`` on a free loopback port in a thread of this process (no signal handling); yields its base
    URL and stops the server on exit."""
    sock = bind(host, 0)
    server = _uvicorn_server(app, 5.0)
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        while not server.started:
            if not t.is_alive():
                raise RuntimeError("the server thread ended before it started")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        t.join(30)
        sock.close()


def launch(checkpoint: str | os.PathLike[str], args: Sequence[str] = (), *, timeout: float = 120.0,
           stderr: Any = None, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start ``python -m moesaic serve CHECKPOINT --port 0 ARGS`` and wait for its ready line; returns the
    process and the base URL (``http://127.0.0.1:PORT``). Stop it with ``proc.terminate(); proc.wait()``."""
    cmd = [sys.executable, "-m", "moesaic", "serve", str(checkpoint), "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    assert proc.stdout is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline() if proc.stdout else ""), daemon=True)
    reader.start()
    reader.join(timeout)
    m = READY_RE.match(box[0]) if box else None
    if m is None:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"moesaic serve did not start (exit {proc.returncode}; first line {box[:1]!r})")
    return proc, f"{m.group(1)}:{m.group(2)}"
