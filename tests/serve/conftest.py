"""A tiny Shakespeare MoE checkpoint with a long context (2048, so generations can outlast a disconnect or a
timeout) and a real `moesaic serve` subprocess on loopback, talked to with the official `openai` client."""

import http.client
import json
import signal
import urllib.parse

import pytest

from moesaic.cli import main
from moesaic.serve import launch

openai = pytest.importorskip("openai")

KEY = "sk-moesaic-test"


@pytest.fixture(scope="session")
def serve_ckpt(tmp_path_factory, tiny_config):
    out = tmp_path_factory.mktemp("serve-run") / "tiny-lm"
    assert main(["train", str(tiny_config), "--out", str(out), "--set", "train.max_steps=2",
                 "--set", "model.max_seq_len=2048"]) == 0
    return out


class Reply:
    def __init__(self, status, content, headers):
        self.status_code, self.content, self.headers = status, content, headers

    @property
    def text(self):
        return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


class Server:
    def __init__(self, ckpt, args):
        self.proc, self.url = launch(ckpt, ["--threads", "1", *args])

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=kw.pop("timeout", 120),
                             **kw)

    def request(self, method, path, body=None, headers=None, timeout=60):
        """A raw HTTP request (stdlib): ``body`` bytes, an iterable of bytes (sent chunked) or None."""
        u = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        try:
            chunked = body is not None and not isinstance(body, (bytes, str))
            conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
            r = conn.getresponse()
            return Reply(r.status, r.read(), dict(r.getheaders()))
        finally:
            conn.close()

    def get(self, path, headers=None):
        return self.request("GET", path, headers=headers)

    def post(self, path, json_body=None, key=KEY, content=None, headers=None, timeout=60):
        h = {"content-type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
             **(headers or {})}
        body = json.dumps(json_body).encode() if json_body is not None else content
        return self.request("POST", path, body, h, timeout)

    def metric(self, name):
        """The value of one sample of /metrics, named with its labels (0 when absent)."""
        for ln in self.get("/metrics").text.splitlines():
            if ln.startswith(name + " "):
                return float(ln.rsplit(" ", 1)[1])
        return 0.0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="session")
def server(serve_ckpt):
    """The main server: API key set, continuous batching of up to 4 sequences."""
    s = Server(serve_ckpt, ["--api-key", KEY, "--max-batch", "4"])
    yield s
    assert s.stop() == 0
