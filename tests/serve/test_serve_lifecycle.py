"""Queue bound (429), a client that leaves cancels its generation (streamed and not), the request timeout
(408), and SIGTERM: running requests finish, new connections are refused, the process exits 0.

The server decodes one sequence at a time with one waiting request allowed, so the states are exact: a
stream that has sent its first chunk holds the only row for its 2000 tokens (seconds here: greedy, and this
model never emits its end token after "KING") unless it is cancelled."""

import http.client
import threading
import time
import urllib.parse

import pytest

from .conftest import KEY, Server, openai


@pytest.fixture(scope="module")
def small(serve_ckpt):
    s = Server(serve_ckpt, ["--max-batch", "1", "--max-queue", "1", "--model-name", "m", "--shutdown-grace", "1"])
    yield s
    s.stop()


def _wait(cond, what, timeout=30.0):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _long_stream(server):
    """Start a 2000-token stream and return it once its first chunk arrived (it holds the row)."""
    stream = server.client(key="x").completions.create(model="m", prompt="KING", max_tokens=2000, stream=True,
                                                          temperature=0)
    it = iter(stream)
    next(it)
    return stream


def test_queue_full_429_and_disconnect_cancels_the_stream(small):
    c = small.client(key="x")
    cancelled = 'moesaic_requests_cancelled_total{reason="disconnect"}'
    stream = _long_stream(small)
    assert small.get("/health").json()["running"] == 1
    done = {}
    waiter = threading.Thread(target=lambda: done.setdefault("r", c.completions.create(
        model="m", prompt="QUEEN", max_tokens=5, temperature=0)))
    waiter.start()
    _wait(lambda: small.get("/health").json()["waiting"] == 1, "the second request to queue")
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model="m", prompt="LEAR", max_tokens=5)
    assert e.value.status_code == 429 and e.value.body.get("error", e.value.body)["code"] == "queue_full"
    assert small.metric("moesaic_requests_rejected_total") == 1
    stream.close()  # the client leaves: its generation ends and the queued request gets the row
    waiter.join(60)
    assert done["r"].usage.completion_tokens == 5
    _wait(lambda: small.metric(cancelled) == 1, "the cancellation to be counted")
    assert small.metric("moesaic_completion_tokens_total") < 1000  # the 2000-token stream stopped early


def test_disconnect_cancels_a_plain_request(small):
    cancelled = 'moesaic_requests_cancelled_total{reason="disconnect"}'
    before = small.metric(cancelled)
    u = urllib.parse.urlsplit(small.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/completions", headers={"content-type": "application/json"},
                 body=b'{"model": "m", "prompt": "KING", "max_tokens": 2000, "temperature": 0}')
    _wait(lambda: small.get("/health").json()["running"] == 1, "the request to run")
    conn.close()
    _wait(lambda: small.metric(cancelled) == before + 1, "the disconnect to cancel the generation")
    _wait(lambda: small.get("/health").json()["running"] == 0, "the row to free up")
    r = small.client(key="x").completions.create(model="m", prompt="KING", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_a_prompt_list_over_the_queue_is_refused_whole(small):
    """1 row + 1 queue place: a list of 3 prompts gets a 429 and none of it runs; a list of 2 fits."""
    c = small.client(key="x")
    with pytest.raises(openai.RateLimitError):
        c.completions.create(model="m", prompt=["KING", "QUEEN", "LEAR"], max_tokens=3, temperature=0)
    _wait(lambda: small.get("/health").json() | {"model": 0} == {"status": "ok", "model": 0, "running": 0,
                                                                   "waiting": 0}, "the admitted prompts to end")
    r = c.completions.create(model="m", prompt=["KING", "QUEEN"], max_tokens=3, temperature=0)
    assert len(r.choices) == 2 and r.usage.completion_tokens == 6


def test_request_timeout_answers_408(serve_ckpt):
    s = Server(serve_ckpt, ["--request-timeout", "1", "--model-name", "m"])
    try:
        long = {"model": "m", "prompt": "KING", "max_tokens": 2000, "temperature": 0}
        t0 = time.monotonic()
        r = s.post("/v1/completions", long, key=None, timeout=120)
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
        assert 1.0 < time.monotonic() - t0 < 60
        assert s.metric('moesaic_requests_cancelled_total{reason="timeout"}') == 1
        # a stream that times out ends with an error event, then [DONE]
        events = [e for e in s.post("/v1/completions", dict(long, stream=True), key=None, timeout=120).text.split(
            "\n\n") if e.startswith("data: ")]
        assert '"code": "timeout"' in events[-2] and events[-1] == "data: [DONE]"
        assert s.post("/v1/completions", dict(long, max_tokens=3), key=None).status_code == 200
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_running_requests_and_exits_0(serve_ckpt):
    s = Server(serve_ckpt, ["--api-key", KEY, "--model-name", "m"])
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", s.client().completions.create(
        model="m", prompt="KING", max_tokens=600, temperature=0)))
    t.start()
    _wait(lambda: s.get("/health").json()["running"] == 1, "the request to run")
    t0 = time.monotonic()
    rc = s.stop()  # SIGTERM, then wait
    t.join(60)
    assert rc == 0 and time.monotonic() - t0 < 60
    assert out["r"].usage.completion_tokens == 600 and out["r"].choices[0].finish_reason == "length"
    with pytest.raises(ConnectionError):
        s.get("/health")


def test_sigterm_ends_what_outlasts_the_grace(small):
    """Last test of the module (it stops `small`): a 2000-token stream outlasts the 1 s grace, gets an error
    event with code "shutdown" and [DONE]; the process exits 0."""
    out = {}
    body = {"model": "m", "prompt": "KING", "max_tokens": 2000, "temperature": 0, "stream": True}
    t = threading.Thread(target=lambda: out.setdefault("r", small.post("/v1/completions", body, key=None)))
    t.start()
    _wait(lambda: small.get("/health").json()["running"] == 1, "the stream to run")
    t0 = time.monotonic()
    assert small.stop() == 0
    t.join(60)
    assert time.monotonic() - t0 < 30
    events = [e for e in out["r"].text.split("\n\n") if e.startswith("data: ")]
    assert '"code": "shutdown"' in events[-2] and events[-1] == "data: [DONE]"
