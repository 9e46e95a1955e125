"""``moesaic bench layer`` runs on a tiny size, writes JSON, and its output check catches a wrong layer."""

import json

import pytest

from moesaic.bench import layer as bench
from moesaic.bench.impls import Impl
from moesaic.cli import build_parser, main


def _args(tmp_path, *extra):
    return build_parser().parse_args(["bench", "layer", "--T", "8", "--E", "4:2", "--D", "16", "--F", "32",
                                      "--repeats", "1", "--warmup", "0",
                                      "--json", str(tmp_path / "out.json"), *extra])


@pytest.mark.slow
def test_bench_layer_tiny_runs_and_reports(tmp_path, capsys):
    assert bench.run(_args(tmp_path, "--dtype", "fp32")) == 0
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    impls = {r["impl"] for r in rows}
    assert {"limit", "balanced floor", "moesaic auto", "moesaic loop", "moesaic fused"} <= impls
    assert {"transformers Mixtral eager", "transformers Mixtral grouped_mm", "transformers Qwen2-MoE eager",
            "transformers OLMoE eager"} <= impls
    assert {r["dtype"] for r in rows} == {"fp32"}
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and "peak_MB" in r and r["saved_MB"] >= 0
        if r["family"] != "floor":
            assert r["max_abs_diff_fp32"] <= 1e-4
    lim = next(r for r in rows if r["impl"] == "limit" and r["dtype"] == "fp32")
    assert lim["fwd_bwd_vs_limit"] == 1.0
    assert "| moesaic auto |" in capsys.readouterr().out


def test_bench_layer_bf16_subset(tmp_path):
    assert bench.run(_args(tmp_path, "--dtype", "bf16", "--no-peers", "--no-memory", "--impl", "moesaic auto")) == 0
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"moesaic auto", "moesaic auto (olmoe)", "moesaic auto (qwen2)", "limit",
                                         "balanced floor"}
    assert all(r["dtype"] == "bf16" for r in rows)


def test_bench_layer_catches_a_wrong_implementation(tmp_path):
    def wrong(impls):
        ref = next(i for i in impls if i.name == "moesaic loop")
        return [Impl("wrong layer", "mixtral", lambda x: ref.run(x) * 1.01, ref.params)]

    with pytest.raises(bench.BenchMismatchError, match="wrong layer"):
        bench.run(_args(tmp_path, "--no-memory", "--no-peers"), extra=wrong)


def test_bench_cli_bad_dtype_is_one_line_error(capsys):
    assert main(["bench", "layer", "--T", "4", "--E", "4:2", "--D", "16", "--F", "32", "--dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--dtype" in err and err.count("\n") == 1
