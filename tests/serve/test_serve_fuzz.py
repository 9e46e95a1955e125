"""200 malformed requests (wrong types, huge numbers, invalid UTF-8, missing fields, truncated and non-object
JSON, deep nesting, NaN) each get a 4xx in OpenAI's error shape, and the server answers normally after."""

import json
import random

COMPLETION = {"model": "tiny-lm", "prompt": "KING", "max_tokens": 3}
CHAT = {"model": "tiny-lm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

WRONG = {  # field -> values of the wrong type (strict: no coercion of "10" or true to numbers)
    "model": [1, [], {}, True, 1.5],
    "max_tokens": ["10", 1.5, [], {}, True],
    "temperature": ["hot", [], {}, True],
    "top_p": ["x", [], True],
    "stop": [1, [1], {}, True],
    "seed": ["s", 1.5, [], True],
    "n": ["2", 1.5],
    "stream": ["yes", 1, []],
    "stream_options": ["x", [], {"include_usage": "yes"}],
}
HUGE = {
    "max_tokens": [10**30, -10**30, 2**63],
    "temperature": [1e308, -1e-300],
    "top_p": [1e308],
    "seed": [10**40, -10**40],
    "n": [10**20],
    "logprobs": [10**9],
}
PROMPTS = [1, {}, [1.5], [[1, "a"]], True, [None], [10**30], [-1], [[]], ""]
MESSAGES = ["hi", [], [{}], [{"role": 1, "content": "x"}], [{"role": "user", "content": 5}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            [{"role": "user", "content": "hi"}] * 2 + [{"role": "king"}]]


def _cases():
    rnd = random.Random(17)
    out = []  # (path, body bytes)
    for path, base in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        for table in (WRONG, HUGE):
            for field, values in table.items():
                out += [(path, json.dumps({**base, field: v}).encode()) for v in values]
        for field in base:  # each required field missing, and all of them
            if field != "max_tokens":
                out.append((path, json.dumps({k: v for k, v in base.items() if k != field}).encode()))
        out.append((path, b"{}"))
        for v in ("[]", '"str"', "1", "null", "true", "", " "):  # not an object
            out.append((path, v.encode()))
        good = json.dumps(base).encode()
        for cut in sorted(rnd.sample(range(1, len(good)), 20)):  # truncated JSON
            out.append((path, good[:cut]))
        for bad in (b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", bytes(rnd.randrange(128, 256) for _ in range(8))):
            out.append((path, good.replace(b"KING" if b"KING" in good else b"hi", bad)))  # invalid UTF-8
            out.append((path, bad + good))
        out.append((path, b'{"model": "tiny-lm", "temperature": NaN, ' + good[1:]))
        out.append((path, good[:-1] + b', "top_p": Infinity}'))
        out.append((path, good[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"))  # deep nesting
    for _ in range(20):  # two wrong fields at once
        a, b = rnd.sample(sorted(WRONG), 2)
        out.append(("/v1/completions", json.dumps({**COMPLETION, a: rnd.choice(WRONG[a]), b: rnd.choice(WRONG[b])})
                    .encode()))
    out += [("/v1/completions", json.dumps({**COMPLETION, "prompt": p}).encode()) for p in PROMPTS]
    out += [("/v1/completions", b'{"model": "tiny-lm", "prompt": "a\\ud800b"}'),  # lone surrogates, escaped
            ("/v1/completions", b'{"model": "\\ud800", "prompt": "a"}'),
            ("/v1/chat/completions", b'{"model": "tiny-lm", "messages": [{"role": "user", "content": "\\udfff"}]}')]
    out += [("/v1/chat/completions", json.dumps({**CHAT, "messages": m}).encode()) for m in MESSAGES]
    return out


def test_200_malformed_requests_get_4xx_json_and_the_server_goes_on(server):
    cases = _cases()
    assert len(cases) >= 200, len(cases)
    statuses = []
    for path, body in cases:
        r = server.post(path, content=body)
        statuses.append(r.status_code)
        assert 400 <= r.status_code < 500, (path, body[:120], r.status_code, r.text[:300])
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"], err
    assert set(statuses) == {400, 404}  # 404: the one unknown (surrogate) model name
    assert server.get("/health").json()["status"] == "ok"
    c = server.client()
    r = c.completions.create(model="tiny-lm", prompt="KING", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
    assert server.metric('moesaic_requests_total{endpoint="/v1/completions",status="500"}') == 0
