"""`moesaic bench serve` runs end to end on a small setting: every request answered, numbers written."""

import json

from moesaic.cli import main


def test_bench_serve_small(serve_ckpt, tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--checkpoint", str(serve_ckpt), "--clients", "3", "--requests", "6",
                 "--max-tokens", "4", "--batches", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["max_batch"], r["clients"]) for r in rows] == [(3, 1), (3, 3)]
    assert all(r["errors"] == 0 and r["requests"] == 6 and r["p99_s"] >= r["p50_s"] > 0 for r in rows)
    assert 0.0 <= rows[1]["identical_to_single"] <= 1.0
    assert "same as 1 client" in capsys.readouterr().out
