"""`moesaic generate` with offloaded experts (--offload-dir, --cache-experts, --cache-policy, --prefetch): the
same greedy text as resident decoding, the store written once and reused, telemetry in --json; bad flags
and broken stores exit 2 with one line."""

import json
import os

import pytest

from moesaic.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_config):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", str(tiny_config), "--out", str(out), "--set", "train.max_steps=2"]) == 0
    return out


GEN = ["--prompt", "KING", "--prompt", "QUEEN OF", "--temperature", "0", "--max-new-tokens", "8", "--json"]


def _rows(capsys):
    return [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]


def test_offloaded_generate_equals_resident(ckpt, tmp_path, capsys):
    assert main(["generate", str(ckpt), *GEN]) == 0
    want = [r["text"] for r in _rows(capsys)]
    store = tmp_path / "experts"
    runs = [["--offload-dir", str(store), "--cache-experts", "2", "--prefetch", "pregate"],
            ["--offload-dir", str(store), "--cache-experts", "3", "--cache-policy", "lfu", "--offload-stats"],
            ["--cache-experts", "2", "--cache-policy", "oracle", "--prefetch", "prev"],
            ["--offload-dir", str(store), "--cache-experts", "2", "--cache-policy", "lfru", "--offload-verify", "open"]]
    for flags in runs:
        assert main(["generate", str(ckpt), *GEN, *flags]) == 0, flags
        rows = _rows(capsys)
        assert [r["text"] for r in rows] == want, flags
        t = rows[0]["offload"]
        assert t["hits"] + t["misses"] == t["accesses"] > 0 and t["bytes_read"] > 0
    assert (store / "manifest.json").is_file()


@pytest.mark.parametrize("flags,needle", [
    (["--cache-experts", "1"], "must be >= top_k = 2"),
    (["--cache-experts", "2", "--cache-policy", "mru"], "--cache-policy = 'mru'"),
    (["--cache-experts", "2", "--prefetch", "soon"], "--prefetch = 'soon'"),
    (["--cache-experts", "0"], "--cache-experts = 0"),
    (["--offload-dir", "{tmp}"], "--cache-experts"),
    (["--offload-dir", "{tmp}", "--cache-experts", "2"], "is not an expert store"),
    (["--cache-experts", "2", "--offload-verify", "never"], "--offload-verify"),
])
def test_bad_offload_flags_exit_2_with_one_line(ckpt, tmp_path, capsys, flags, needle):
    (tmp_path / "junk.txt").write_text("x")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    assert main(["generate", str(ckpt), "--prompt", "KING", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_broken_store_exits_2(ckpt, tmp_path, capsys):
    store = tmp_path / "s"
    assert main(["generate", str(ckpt), "--prompt", "KING", "--max-new-tokens", "2", "--offload-dir", str(store),
                 "--cache-experts", "2"]) == 0
    capsys.readouterr()
    f = sorted(store.glob("layer-*.safetensors"))[0]
    os.truncate(f, f.stat().st_size - 8)
    assert main(["generate", str(ckpt), "--prompt", "KING", "--offload-dir", str(store), "--cache-experts", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated" in err[0], err
    os.remove(f)
    assert main(["generate", str(ckpt), "--prompt", "KING", "--offload-dir", str(store), "--cache-experts", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expert file missing" in err[0], err


def test_pregate_route_flag(ckpt, capsys):
    base = ["generate", str(ckpt), "--prompt", "KING", "--temperature", "0", "--max-new-tokens", "6", "--json"]
    assert main([*base, "--pregate-route"]) == 0
    want = _rows(capsys)[0]
    assert want["pregate_route"] is True
    assert main([*base, "--pregate-route", "--cache-experts", "2", "--prefetch", "pregate"]) == 0
    got = _rows(capsys)[0]
    assert got["text"] == want["text"] and got["offload"]["hint_precision"] == 1.0
    assert main(["eval", str(ckpt), "--pregate-route"]) == 0
    assert "val_loss" in capsys.readouterr().out


def test_quantize_experts_flag(ckpt, capsys):
    assert main(["eval", str(ckpt), "--quantize-experts", "int8", "--quant-group", "8"]) == 0
    assert "quantized" in capsys.readouterr().out
    assert main(["generate", str(ckpt), "--prompt", "KING", "--quantize-experts", "int8", "--quant-group", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quant.group_size = 5" in err[0], err
    assert main(["eval", str(ckpt), "--quantize-experts", "plan", "--quant-group", "8",
                 "--quant-calib-windows", "4"]) == 0
    out = capsys.readouterr().out
    assert "'mode': 'plan'" in out and "'int4_experts'" in out
    assert main(["eval", str(ckpt), "--quantize-experts", "int4", "--quant-group", "8"]) == 0
    assert main(["eval", str(ckpt), "--quantize-experts", "plan", "--quant-hot", "2"]) == 2
    assert "--quant-hot = 2.0: must be in [0, 1]" in capsys.readouterr().err


def test_quantize_experts_ternary_flag(ckpt, capsys):
    assert main(["eval", str(ckpt), "--quantize-experts", "ternary", "--quant-group", "0",
                 "--ternary-code-bits", "8"]) == 0
    out = capsys.readouterr().out
    assert "'mode': 'ternary'" in out and "'ternary_experts': 8" in out and "bits_per_weight" in out
    assert main(["generate", str(ckpt), *GEN, "--quantize-experts", "ternary", "--quant-group", "8"]) == 0
    rows = _rows(capsys)
    assert len(rows) == 2 and rows[0]["quantized"]["bits_per_weight"] < 8  # fp32 scales per 8 weights: 4 of them
    assert main(["generate", str(ckpt), "--prompt", "KING", "--quantize-experts", "ternary",
                 "--ternary-threshold", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quant.ternary_threshold = -1.0" in err[0], err
    assert main(["eval", str(ckpt), "--quantize-experts", "int8", "--quant-group", "0"]) == 2
    assert "ternary experts only" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "--quantize-experts", "ternary", "--ternary-gptq", "--quant-group", "8",
                 "--quant-calib-windows", "4"]) == 0
    assert "'gptq': True" in capsys.readouterr().out
    assert main(["eval", str(ckpt), "--quantize-experts", "int4", "--ternary-gptq", "--quant-group", "8",
                 "--quant-calib-windows", "4"]) == 2
    assert "quant.gptq = True: is for ternary experts only" in capsys.readouterr().err
