"""`moesaic serve` fuzzing for benchmarks/chaos/run.py: fuzzed HTTP requests (bad JSON, wrong types,
out-of-range and huge numbers, unicode, deep nesting, oversized bodies, wrong methods and paths, malformed
HTTP) and clients that disconnect abruptly (TCP reset) while a completion streams, in a warm-up round and
two equal rounds; then /health, the server's memory growth between the two equal rounds, and its stderr.

Every answer must be a status the API documents (2xx, or 4xx with OpenAI's JSON error body on /v1/*);
a 5xx, a request that takes longer than its timeout, a traceback on the server's stderr or a dead server
fails the case."""

from __future__ import annotations

import http.client
import json
import random
import re
import socket
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

READY = re.compile(r"moesaic serve: listening on http://(\S+):(\d+)")
WEIRD: list[Any] = [None, -1, 0, 1, 2**64, -(2**63) - 1, 10**30, 1e308, "1", "", "💥", "a" * 10000, [], {}, [1, "x"],
                    {"x": {"y": []}}, True, 0.5, -0.0, "NaN", "Infinity"]
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
          "stream_options", "logprobs", "echo", "logit_bias", "max_completion_tokens", "response_format", "tools"]
OK_STATUS = {200, 400, 401, 404, 405, 408, 413, 415, 422, 429}
REQ_TIMEOUT = 60.0
BODY_LIMIT = 1 << 20  # moesaic serve's default --body-limit


def _body(rng: random.Random, model: str, chat: bool) -> bytes | str:
    base: dict[str, Any] = {"model": model, "max_tokens": rng.randint(1, 6), "temperature": 0.0}
    if chat:
        base["messages"] = [{"role": "user", "content": "To be"}]
    else:
        base["prompt"] = "To be, or not"
    if rng.random() < 0.3:
        base["stream"] = True
    kind = rng.random()
    if kind < 0.15:
        return json.dumps(base)  # a valid request
    if kind < 0.65:  # 1-3 fields set to weird values, deleted, or added
        for _ in range(rng.randint(1, 3)):
            f = rng.choice(FIELDS + ["ünï", "x" * 300])
            if rng.random() < 0.2:
                base.pop(f, None)
            else:
                base[f] = rng.choice(WEIRD)
        return json.dumps(base)
    if kind < 0.72:
        return json.dumps(base)[: rng.randint(0, 30)]  # truncated JSON
    if kind < 0.77:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))).decode("latin-1")
    if kind < 0.82:
        n = rng.randint(100, 3000)  # written as text: json.dumps itself would recurse too deep
        return json.dumps({**base, "prompt": 0}).replace('"prompt": 0', '"prompt": ' + "[" * n + "1" + "]" * n)
    if kind < 0.86:
        return json.dumps({**base, "prompt": "x" * (2 << 20)})  # over the 1 MiB body limit
    if kind < 0.9:
        return json.dumps({**base, "prompt": [rng.randint(-5, 2**40) for _ in range(rng.randint(1, 50))]})
    return json.dumps(rng.choice([[], 3, "str", None, [base]]))


def fuzz_request(rng: random.Random, model: str) -> tuple[str, str, dict[str, str], bytes]:
    r = rng.random()
    path = ("/v1/completions" if r < 0.45 else "/v1/chat/completions" if r < 0.85 else
            rng.choice(["/v1/models", "/health", "/metrics", "/v1/nope", "/%00", "/v1/completions/../../etc",
                        "/" + "a" * 5000]))
    method = "POST" if rng.random() < 0.9 else rng.choice(["GET", "PUT", "DELETE", "PATCH"])
    body = _body(rng, model, "chat" in path)
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    headers = {"Content-Type": rng.choice(["application/json"] * 8 + ["text/plain", "application/x-www-form"])}
    return method, path, headers, data


def send(port: int, req: tuple[str, str, dict[str, str], bytes]) -> tuple[int | str, bytes, float]:
    method, path, headers, data = req
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=REQ_TIMEOUT)
    try:
        c.request(method, path, body=data, headers=headers)
        r = c.getresponse()
        body = r.read()
        return r.status, body, time.perf_counter() - t0
    except TimeoutError:
        return "TIMEOUT", b"", time.perf_counter() - t0
    except (ConnectionError, http.client.HTTPException) as e:
        return f"closed ({type(e).__name__})", b"", time.perf_counter() - t0
    finally:
        c.close()


def disconnect(port: int, model: str, i: int) -> str:
    """A streaming completion whose client resets the connection (before or after the first chunk)."""
    body = json.dumps({"model": model, "prompt": "Now is the winter", "max_tokens": 12, "stream": True,
                       "temperature": 1.0, "seed": i}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=REQ_TIMEOUT)
    try:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        if i % 2:  # after the first streamed chunk
            while b"data:" not in got:
                chunk = s.recv(4096)
                if not chunk or (got + chunk)[:12] not in b"HTTP/1.1 200"[: len(got + chunk)]:
                    return f"NOT STREAMED: {(got + chunk)[:60]!r}"
                got += chunk
        return "reset after first chunk" if i % 2 else "reset before the answer"
    finally:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        s.close()


def malformed_http(port: int, rng: random.Random) -> int | str:
    raw = rng.choice([b"GARBAGE\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n{",
                      b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                      b"GET / HTTP/9.9\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\0" * 40])
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        head = s.recv(64)
        m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
        return int(m.group(1)) if m else "closed"
    except (TimeoutError, ConnectionError):
        return "closed"
    finally:
        s.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def serve_fuzz(run: Any, checkpoint: Path, n_req: int, n_disc: int, seed: int) -> list[dict]:
    model = "chaos"
    cmd = [sys.executable, "-m", "moesaic", "serve", str(checkpoint), "--port", "0", "--threads", "1",
           "--model-name", model, "--request-timeout", "30", "--shutdown-grace", "5"]
    errlog = (run.work / "serve.stderr").open("w+")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errlog, text=True, env=run.env)
    try:
        line = p.stdout.readline() if p.stdout else ""
        m = READY.search(line)
        if not m:
            p.kill()
            return [{"case": "moesaic serve starts", "expect": "ready line", "got": line[:200], "ok": False,
                     "traceback": False, "hang": False, "lost": False}]
        port = int(m.group(2))
        # rounds: warm-up 20 %, then two equal rounds of 40 % each (the same requests, the same seed)
        plan = [("warm-up", n_req // 5, n_disc // 5, seed), ("round 1", 2 * n_req // 5, 2 * n_disc // 5, seed + 1),
                ("round 2", 2 * n_req // 5, 2 * n_disc // 5, seed + 1)]
        statuses: dict[str, int] = {}
        bad: list[str] = []
        slowest = 0.0
        disc: dict[str, int] = {}
        rss = {}
        for name, nr, nd, s in plan:
            rng = random.Random(s)
            reqs = [fuzz_request(rng, model) for _ in range(nr)]
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda q: send(port, q), reqs))
                disc_res = list(pool.map(lambda i: disconnect(port, model, i), range(nd)))
            for q, (st, body, wall) in zip(reqs, results):
                slowest = max(slowest, wall)
                if isinstance(st, str) and st.startswith("closed") and len(q[3]) > BODY_LIMIT:
                    st = "reset while sending a body over --body-limit"  # the server answered 413 and closed
                    statuses[st] = statuses.get(st, 0) + 1
                    continue
                statuses[str(st)] = statuses.get(str(st), 0) + 1
                err_shape = st == 200 or not q[1].startswith("/v1/") or st in (404, 405) or _openai_error(body)
                if st not in OK_STATUS or not err_shape:
                    bad.append(f"{q[0]} {q[1][:40]} -> {st} {body[:120]!r}")
            for d in disc_res:
                disc[d] = disc.get(d, 0) + 1
            for _ in range(nr // 50):
                st = malformed_http(port, rng)
                statuses[f"raw {st}"] = statuses.get(f"raw {st}", 0) + 1
                if isinstance(st, int) and st >= 500:
                    bad.append(f"malformed HTTP -> {st}")
            time.sleep(1.0)  # let cancelled generations drain
            rss[name] = rss_kib(p.pid)
        health = send(port, ("GET", "/health", {}, b""))
        alive = p.poll() is None
    finally:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    errlog.seek(0)
    stderr = errlog.read()
    tb = "Traceback" in stderr
    growth = (rss["round 2"] - rss["round 1"]) / rss["round 1"]
    n_total = sum(v for k, v in statuses.items() if not k.startswith("raw"))
    n_raw = sum(v for k, v in statuses.items() if k.startswith("raw"))
    hang = statuses.get("TIMEOUT", 0) > 0
    streamed = not any(k.startswith("NOT") for k in disc)
    rows = [
        {"case": f"{n_total} fuzzed requests (4 clients at a time) + {n_raw} malformed HTTP",
         "expect": f"every answer one of {sorted(OK_STATUS)}, 4xx with OpenAI's error JSON on /v1/*, none slower "
                   f"than {REQ_TIMEOUT:.0f} s",
         "got": ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())) + f"; slowest {slowest:.1f} s"
                + (f"; BAD {bad[:3]}" if bad else ""),
         "ok": not bad and not hang, "traceback": False, "hang": hang, "lost": False},
        {"case": f"{sum(disc.values())} clients reset the connection during a streamed completion",
         "expect": "the server goes on", "got": ", ".join(f"{k}: {v}" for k, v in sorted(disc.items())),
         "ok": alive and health[0] == 200 and streamed, "traceback": False, "hang": False, "lost": False},
        {"case": "/health afterwards, server stderr", "expect": "200, no traceback on the server's stderr",
         "got": f"{health[0]} {health[1][:60]!r}; alive {alive}; traceback in stderr: {tb}",
         "ok": health[0] == 200 and alive and not tb, "traceback": tb, "hang": False, "lost": False},
        {"case": "server memory (VmRSS) after warm-up, round 1, round 2 (equal rounds)",
         "expect": "round 2 < round 1 + 10 %",
         "got": f"{rss['warm-up'] / 1024:.0f} / {rss['round 1'] / 1024:.0f} / {rss['round 2'] / 1024:.0f} MiB, "
                f"growth {100 * growth:+.1f} %", "ok": growth < 0.10, "traceback": False, "hang": False,
         "lost": False},
    ]
    return rows


def _openai_error(body: bytes) -> bool:
    try:
        e = json.loads(body)["error"]
        return isinstance(e, dict) and isinstance(e.get("message"), str)
    except (ValueError, KeyError, TypeError):
        return False
