"""`moesaic generate` (batch, stop strings, JSON, the MoE decoding strategies) and `moesaic eval` with the
strategy flags; bad flags exit 2 with one line."""

import json

import pytest

from moesaic.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_config):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", str(tiny_config), "--out", str(out), "--set", "train.max_steps=2"]) == 0
    return out


def test_generate_batch_stop_json_and_strategies(ckpt, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("KING\n\nQUEEN\n")
    assert main(["generate", str(ckpt), "--prompt", "LEAR", "--prompts-file", str(f), "--temperature", "0",
                 "--max-new-tokens", "6", "--json"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["LEAR", "KING", "QUEEN"]
    assert all(r["completion_tokens"] == 6 and r["finish_reason"] == "length" for r in rows)
    stop = rows[0]["text"][2:4]
    assert main(["generate", str(ckpt), "--prompt", "LEAR", "--temperature", "0", "--max-new-tokens", "6",
                 "--stop", stop, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["finish_reason"] == "stop" and r["text"] == rows[0]["text"][:rows[0]["text"].find(stop)]
    for flags in (["--top-k", "1"], ["--top-k", "0=1", "--top-k", "1=3"], ["--scmoe"], ["--early-exit", "0.5"],
                  ["--drop", "1", "--drop-kind", "mlp"], ["--compile", "--max-new-tokens", "2"]):
        assert main(["generate", str(ckpt), "--prompt", "KING", "--max-new-tokens", "4", "--temperature", "0",
                     *flags]) == 0, flags
        assert capsys.readouterr().out.startswith("KING")
    assert main(["eval", str(ckpt), "--top-k", "2"]) == 0
    same = capsys.readouterr().out
    assert main(["eval", str(ckpt)]) == 0
    assert capsys.readouterr().out.split("top_k")[0].strip() == same.split("top_k")[0].strip()  # k unchanged


@pytest.mark.parametrize("flags,needle", [
    (["--top-k", "5"], "top_k = 5: must be in [1, num_experts] = [1, 4]"),
    (["--top-k", "two"], "--top-k"),
    (["--scmoe", "--scmoe-alpha", "1.5"], "scmoe.alpha"),
    (["--scmoe", "--scmoe-rank", "9"], "scmoe.weak_rank"),
    (["--drop", "99"], "llm_drop.n"),
    (["--early-exit", "2"], "early_exit.threshold"),
    (["--sample-top-k", "-1"], "top_k"),
    (["--stream", "--prompt", "QUEEN"], "--stream"),
])
def test_bad_flags_exit_2_with_one_line(ckpt, capsys, flags, needle):
    for verb in (["generate", str(ckpt), "--prompt", "KING"], ["eval", str(ckpt)]):
        if verb[0] == "eval" and flags[0] in ("--sample-top-k", "--stream"):
            continue
        assert main([*verb, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
