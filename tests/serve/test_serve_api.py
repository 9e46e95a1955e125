"""`moesaic serve` through the official `openai` client: completion and chat equal `moesaic generate`,
streams join to the non-streamed text, usage, stop strings, seeds, every error status, the API key,
/v1/models, /health and /metrics."""

import json
import socket
import urllib.parse

import pytest

from moesaic.cli import main
from moesaic.serve.chat import plain_prompt

from .conftest import KEY, openai


def _generate(ckpt, prompt, n, capsys, *extra):
    capsys.readouterr()
    assert main(["generate", str(ckpt), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", str(n),
                 "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_greedy_completion_equals_moesaic_generate(server, serve_ckpt, capsys):
    c = server.client()
    for prompt, n in (("KING", 24), ("To be, or not", 40)):
        r = c.completions.create(model="tiny-lm", prompt=prompt, max_tokens=n, temperature=0)
        ref = _generate(serve_ckpt, prompt, n, capsys)
        assert r.choices[0].text == ref["text"]
        assert r.choices[0].finish_reason == ref["finish_reason"] == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref["prompt_tokens"], n)
        assert r.usage.total_tokens == ref["prompt_tokens"] + n
        assert r.model == "tiny-lm" and r.object == "text_completion"
    # token ids as the prompt
    ids = [5, 6, 7, 8]
    by_ids = c.completions.create(model="tiny-lm", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.usage.prompt_tokens == 4 and by_ids.usage.completion_tokens == 8


def test_a_list_of_prompts_gets_one_choice_each(server):
    c = server.client()
    prompts = ["KING", "QUEEN", "To be"]
    batch = c.completions.create(model="tiny-lm", prompt=prompts, max_tokens=9, temperature=0)
    single = [c.completions.create(model="tiny-lm", prompt=p, max_tokens=9, temperature=0) for p in prompts]
    assert [ch.index for ch in batch.choices] == [0, 1, 2]
    assert [ch.text for ch in batch.choices] == [s.choices[0].text for s in single]
    assert batch.usage.prompt_tokens == sum(len(p) for p in prompts) and batch.usage.completion_tokens == 27
    # sampled: prompt i uses seed + i, as moesaic.complete does
    sampled = c.completions.create(model="tiny-lm", prompt=["KING", "KING"], max_tokens=12, temperature=1, seed=5)
    again = [c.completions.create(model="tiny-lm", prompt="KING", max_tokens=12, temperature=1, seed=s)
             for s in (5, 6)]
    assert [ch.text for ch in sampled.choices] == [a.choices[0].text for a in again]


def test_chat_uses_the_plain_template(server):
    c = server.client()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    chat = c.chat.completions.create(model="tiny-lm", messages=msgs, max_tokens=16, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    text = plain_prompt([(m["role"], m["content"]) for m in msgs])
    assert text == "system: Be brief.\nuser: Who art thou?\nassistant:"
    comp = c.completions.create(model="tiny-lm", prompt=text, max_tokens=16, temperature=0)
    assert chat.choices[0].message.content == comp.choices[0].text
    assert chat.usage.prompt_tokens == comp.usage.prompt_tokens == len(text)  # char tokenizer
    # max_completion_tokens (the newer name) wins
    short = c.chat.completions.create(model="tiny-lm", messages=msgs, max_completion_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


@pytest.mark.parametrize("chat", [False, True])
def test_stream_joins_to_the_text_for_the_same_seed(server, chat):
    c = server.client()
    kw = dict(model="tiny-lm", max_tokens=30, temperature=0.9, top_p=0.95, seed=11)
    if chat:
        make = lambda **k: c.chat.completions.create(messages=[{"role": "user", "content": "Speak"}], **kw, **k)
        text_of = lambda ch: ch.delta.content or ""
        full = make().choices[0].message.content
    else:
        make = lambda **k: c.completions.create(prompt="ROMEO:", **kw, **k)
        text_of = lambda ch: ch.text
        full = make().choices[0].text
    chunks = list(make(stream=True, stream_options={"include_usage": True}))
    body = [ch for ch in chunks if ch.choices]
    assert "".join(text_of(ch.choices[0]) for ch in body) == full
    assert [ch.choices[0].finish_reason for ch in body].count("length") == 1
    assert body[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert all(ch.usage is None for ch in chunks[:-1])
    assert len(body) > 5  # it really streamed
    # the raw stream ends with data: [DONE]; no usage chunk without include_usage
    path = "/v1/chat/completions" if chat else "/v1/completions"
    payload = dict(kw, stream=True, **({"messages": [{"role": "user", "content": "Speak"}]} if chat else
                                       {"prompt": "ROMEO:"}))
    raw = server.post(path, payload).text
    events = [ln[6:] for ln in raw.split("\n\n") if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and all("usage" not in json.loads(e) for e in events[:-1])


def test_seed_reproduces_and_other_seeds_differ(server):
    c = server.client()
    run = lambda seed: c.completions.create(model="tiny-lm", prompt="KING", max_tokens=24, temperature=1.0,
                                            seed=seed).choices[0].text
    a, b, other = run(3), run(3), [run(s) for s in (4, 5)]
    assert a == b and any(o != a for o in other)


def test_stop_strings_cut_and_never_stream(server):
    c = server.client()
    full = c.completions.create(model="tiny-lm", prompt="KING", max_tokens=30, temperature=0).choices[0].text
    stop = full[6:8]
    cut = full[:full.find(stop)]
    r = c.completions.create(model="tiny-lm", prompt="KING", max_tokens=30, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens <= len(cut) + len(stop)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny-lm", prompt="KING", max_tokens=30, temperature=0, stop=stop, stream=True))
    assert streamed == cut


def test_models_health_and_unknown_fields(server):
    c = server.client()
    assert [m.id for m in c.models.list()] == ["tiny-lm"]
    assert c.models.retrieve("tiny-lm").id == "tiny-lm"
    h = server.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    r = c.completions.create(model="tiny-lm", prompt="KING", max_tokens=2, temperature=0, user="someone",
                             extra_body={"metadata": {"a": 1}, "unknown_field": [1, 2]})
    assert r.usage.completion_tokens == 2


def _status(fn):
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value


def _err(e):
    """OpenAI's error object of a refused request (the client keeps the whole body or its "error")."""
    return e.body.get("error", e.body)


@pytest.mark.parametrize("kwargs,param", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=10**9), "max_tokens"),       # prompt + max_tokens over the context
    (dict(prompt="x" * 2100), "prompt"),            # the prompt alone over the context (2048)
    (dict(prompt=""), "prompt"),
    (dict(n=2), "n"),
    (dict(logprobs=2), "logprobs"),
    (dict(echo=True), "echo"),
    (dict(temperature=3.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(prompt=[1, 2, 10**6]), "prompt"),
    (dict(prompt=["one", "two"], stream=True), "prompt"),
    (dict(prompt=["one", ""]), "prompt.1"),
])
def test_bad_fields_answer_400_naming_the_field(server, kwargs, param):
    c = server.client()
    e = _status(lambda: c.completions.create(**{"model": "tiny-lm", "prompt": "KING", "max_tokens": 4, **kwargs}))
    assert e.status_code == 400 and isinstance(e, openai.BadRequestError)
    err = _err(e)
    assert err["type"] == "invalid_request_error" and err["param"].startswith(param), err
    assert err["message"].startswith(param)


def test_chat_bad_fields_and_error_statuses(server):
    c = server.client()
    msgs = [{"role": "user", "content": "hi"}]
    e = _status(lambda: c.chat.completions.create(model="tiny-lm", messages=msgs, logprobs=True))
    assert e.status_code == 400 and _err(e)["param"] == "logprobs"
    e = _status(lambda: c.chat.completions.create(model="tiny-lm", messages=[], max_tokens=2))
    assert e.status_code == 400 and _err(e)["param"] == "messages"
    e = _status(lambda: c.chat.completions.create(model="tiny-lm", messages=[{"role": "wizard", "content": "x"}]))
    assert e.status_code == 400 and _err(e)["param"].startswith("messages.0.role")
    # 404: unknown model (and unknown path)
    e = _status(lambda: c.completions.create(model="gpt-4o", prompt="hi", max_tokens=2))
    assert isinstance(e, openai.NotFoundError) and _err(e)["code"] == "model_not_found" and _err(e)["param"] == "model"
    assert server.post("/v1/nothing", {}).status_code == 404
    # 401: wrong key, missing key; /health and /metrics need none
    e = _status(lambda: server.client(key="sk-wrong").completions.create(model="tiny-lm", prompt="hi", max_tokens=2))
    assert isinstance(e, openai.AuthenticationError) and _err(e)["code"] == "invalid_api_key"
    r = server.post("/v1/completions", {"model": "tiny-lm", "prompt": "hi"}, key=None)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert server.get("/v1/models").status_code == 401
    assert server.get("/metrics").status_code == 200
    # 413: over the 1 MiB default body limit (declared length and chunked body alike)
    e = _status(lambda: c.completions.create(model="tiny-lm", prompt="x" * (1 << 20), max_tokens=2))
    assert e.status_code == 413 and _err(e)["code"] == "body_too_large"

    # a chunked body (no declared length) is refused once it passes the limit; the server reads the rest
    # (up to 16x the limit) before its 413, so a client still sending gets the answer, not a reset
    counted = 'moesaic_requests_total{endpoint="/v1/completions",status="413"}'
    before = server.metric(counted)
    reply = _send_chunked(server, [b'{"model": "tiny-lm", "prompt": "'] + [b"y" * 65536] * 17 + [b'"}'])
    assert reply.startswith(b"HTTP/1.1 413") and b"body_too_large" in reply, reply[:200]  # drained, then 413
    assert server.metric(counted) == before + 1
    ok = c.completions.create(model="tiny-lm", prompt="x" * 1000, max_tokens=2)  # 1 KB is fine
    assert ok.usage.prompt_tokens == 1000


def _send_chunked(server, chunks):
    """POST /v1/completions with a chunked body over a raw socket; the reply bytes (b"" if the connection was
    reset before any arrived)."""
    u = urllib.parse.urlsplit(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        try:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            for c in chunks:
                s.sendall(b"%x\r\n" % len(c) + c + b"\r\n")
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        reply = b""
        try:
            while data := s.recv(65536):
                reply += data
        except OSError:
            pass
    return reply


def test_metrics_count_requests_tokens_latency_and_expert_load(server):
    c = server.client()
    before = server.metric("moesaic_completion_tokens_total")
    c.completions.create(model="tiny-lm", prompt="KING", max_tokens=7, temperature=0)
    text = server.get("/metrics").text
    assert server.metric("moesaic_completion_tokens_total") == before + 7
    assert 'moesaic_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'moesaic_request_latency_seconds_bucket{endpoint="/v1/completions",le="+Inf"}' in text
    assert "moesaic_time_to_first_token_seconds_count" in text and "moesaic_decode_step_rows_bucket" in text
    load = {}
    for ln in text.splitlines():
        if ln.startswith("moesaic_expert_tokens_total{"):
            labels, v = ln.rsplit(" ", 1)
            load[labels] = float(v)
    layers = {lab.split('layer="')[1].split('"')[0] for lab in load}
    assert layers == {"model.layers.0.mlp", "model.layers.1.mlp"} and len(load) == 8  # 2 layers x 4 experts
    # top-2 routing: each layer saw 2 assignments per routed token, prompt and generated ones alike
    per_layer = {la: sum(v for lab, v in load.items() if la in lab) for la in layers}
    assert len(set(per_layer.values())) == 1 and next(iter(per_layer.values())) % 2 == 0
    assert next(iter(per_layer.values())) >= 2 * (server.metric("moesaic_prompt_tokens_total"))
    assert "moesaic_expert_cache_hits" not in text  # no expert cache exists in moesaic yet
