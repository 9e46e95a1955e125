"""`moesaic bench offload` end to end on a tiny model (store written, resident run, one offloaded run with the
page cache dropped): the table row shows the resident tokens; bad flags exit 2 with one line."""

import json

from moesaic.cli import main

TINY = ["--d-model", "32", "--layers", "2", "--experts", "4", "--d-ff", "64", "--vocab", "64", "--prompt-len", "8",
        "--new-tokens", "4"]


def test_bench_offload_tiny(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "offload", "--dir", str(tmp_path / "w"), *TINY, "--fractions", "50", "--policies", "lfu",
                 "--prefetch", "pregate", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(ln for ln in lines if ln.startswith("| lfu | pregate | 50 % (2)"))
    assert "| yes |" in row
    res = json.loads(out.read_text())
    assert res[0]["telemetry"]["accesses"] == 2 * 2 * 3 and res[-1]["policy"] == "resident"  # 2 layers x k 2 x 3 steps
    assert (tmp_path / "w" / "store" / "manifest.json").is_file()


def test_bench_offload_bad_flags(tmp_path, capsys):
    assert main(["bench", "offload", "--dir", str(tmp_path), "--policies", "mru"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--policies" in err[0]
