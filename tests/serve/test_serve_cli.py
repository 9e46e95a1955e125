"""`moesaic serve` refuses bad flags and paths with one line and exit 2, before or at binding."""

import socket

import pytest

from moesaic.cli import main


@pytest.mark.parametrize("flags,needle", [
    (["--max-batch", "0"], "--max-batch"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--body-limit", "0"], "--body-limit"),
    (["--request-timeout", "-1"], "--request-timeout"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--port", "70000"], "--port"),
    (["--context", "4096"], "context = 4096: must be in [2, the model's context (2048)]"),
])
def test_bad_flags_exit_2_with_one_line(serve_ckpt, capsys, flags, needle):
    assert main(["serve", str(serve_ckpt), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_missing_folder_and_busy_port(serve_ckpt, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert main(["serve", str(serve_ckpt), "--port", str(s.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot listen on 127.0.0.1" in err[0]


def test_decoding_strategy_flags_serve_what_generate_decodes(serve_ckpt, capsys):
    """`--scmoe` (self-contrast decoding, a wrapper around the model) over HTTP equals `moesaic generate --scmoe`."""
    import json

    from .conftest import Server

    s = Server(serve_ckpt, ["--scmoe", "--top-k", "1"])
    try:
        r = s.client(key="x").completions.create(model="tiny-lm", prompt="KING", max_tokens=12, temperature=0)
    finally:
        assert s.stop() == 0
    capsys.readouterr()
    assert main(["generate", str(serve_ckpt), "--prompt", "KING", "--temperature", "0", "--max-new-tokens", "12",
                 "--scmoe", "--top-k", "1", "--json"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert r.choices[0].text == ref["text"] and r.usage.completion_tokens == ref["completion_tokens"]
    plain = json.loads((main(["generate", str(serve_ckpt), "--prompt", "KING", "--temperature", "0",
                              "--max-new-tokens", "12", "--json"]), capsys.readouterr().out)[1])
    assert plain["text"] != ref["text"]  # the flags changed the decoding
