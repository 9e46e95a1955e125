"""`moesaic bench offload` end to end on a tiny model (store written, resident run, one offloaded run with the
page cache dropped): the table row shows the resident tokens; bad flags exit 2 with one line."""

import json

from moesaic.cli import main

TINY = ["--d-model", "32", "--layers", "2", "--experts", "4", "--d-ff", "64", "--vocab", "64", "--prompt-len", "8",
        "--new-tokens", "4"]


def test_bench_offload_tiny(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "offload", "--dir", str(tmp_path / "w"), *TINY, "--fractions", "50", "--policies", "lfu",
                 "--prefetch", "pregate", "--slots", "map", "copy", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    for slots in ("map", "copy"):  # d_model 32, d_ff 64: whole-page experts, so the map slots map
        row = next(ln for ln in lines if ln.startswith(f"| lfu | pregate | {slots} | 50 % (2)"))
        assert "| yes |" in row
    res = json.loads(out.read_text())
    assert res[0]["telemetry"]["accesses"] == 2 * 2 * 3 and res[-1]["policy"] == "resident"  # 2 layers x k 2 x 3 steps
    by_slots = {r["slots"]: r for r in res[:-1]}
    assert by_slots["map"]["cache_bytes"] == 0 < by_slots["map"]["mapped_bytes"]
    # experts of 16 KiB: nothing for 2 MiB entries (tests/inference/test_offload_mapped.py has large experts)
    assert by_slots["map"]["huge_mapped_bytes"] == 0 == by_slots["copy"]["huge_mapped_bytes"]
    assert by_slots["copy"]["cache_bytes"] > 0 and by_slots["map"]["page_cache_bytes"] > 0
    assert (tmp_path / "w" / "store" / "manifest.json").is_file()


def test_bench_offload_bad_flags(tmp_path, capsys):
    assert main(["bench", "offload", "--dir", str(tmp_path), "--policies", "mru"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--policies" in err[0]


def test_bench_offload_paired(tmp_path, capsys):
    """--paired: resident and offloaded runs alternate in one worker; each ratio is to its own round's resident."""
    out = tmp_path / "r.json"
    assert main(["bench", "offload", "--dir", str(tmp_path / "w"), *TINY, "--fractions", "50", "--policies", "lru",
                 "oracle", "--prefetch", "none", "--paired", "2", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    for pol in ("lru", "oracle"):
        row = next(ln for ln in lines if ln.startswith(f"| {pol} | none | map | 50 % (2)"))
        assert row.endswith("| yes |")
    runs = json.loads(out.read_text())
    assert [r["policy"] for r in runs] == ["resident", "lru", "oracle"] * 2
    assert [r["round"] for r in runs] == [0, 0, 0, 1, 1, 1]
