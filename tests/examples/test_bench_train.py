"""``moesaic bench train`` at a tiny size: every implementation trains, the JSON has the ratios the docs quote,
and checkpointing keeps fewer bytes for backward."""

import json

import pytest

from moesaic.cli import main


@pytest.mark.slow
def test_bench_train_tiny_reports_ratios_and_saved_bytes(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    from moesaic.bench import train

    for name, v in {"B": 2, "S": 16, "V": 64, "D": 32, "L": 2}.items():
        monkeypatch.setattr(train, name, v)
    out = tmp_path / "t.json"
    rc = main(["bench", "train", "--repeats", "1", "--warmup", "0", "--threads", "1", "--activation-checkpointing",
               "--json", str(out)])
    assert rc in (0, None)
    r = json.loads(out.read_text())
    assert r["threads"] == 1 and r["clock"] == "wall" and r["allocator"]
    assert set(r["shapes"]) == {"mixtral", "fine"}
    for row in r["shapes"].values():
        tps = row["tokens_per_s"]
        assert set(tps) == {"transformers grouped_mm", "moesaic", "moesaic checkpointed"}
        assert row["moesaic_over_transformers"] == pytest.approx(tps["moesaic"] / tps["transformers grouped_mm"])
        assert row["saved_MiB"]["moesaic checkpointed"] < row["saved_MiB"]["moesaic"]
    text = capsys.readouterr().out
    assert "threads=1" in text and "allocator:" in text and "moesaic / transformers" in text


def test_bench_train_rejects_an_unknown_shape(capsys):
    pytest.importorskip("transformers")
    assert main(["bench", "train", "--shapes", "huge"]) == 2
    err = capsys.readouterr().err
    assert "--shapes 'huge'" in err and "Traceback" not in err
