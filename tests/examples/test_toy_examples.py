"""The toy examples run end to end from their YAML configs (short runs)."""

from moesaic.examples import ewa_merge, toy_regression


def test_toy_regression_trains_and_reports(capsys):
    assert toy_regression.main(["configs/toy_layer.yaml", "--set", "train.max_steps=30"]) == 0
    out = capsys.readouterr().out
    assert "held-out mse" in out and "tokens per expert" in out


def test_toy_regression_bad_config_exits_2(capsys):
    assert toy_regression.main(["configs/toy_layer.yaml", "--set", "model.moe.top_k=9"]) == 2
    assert capsys.readouterr().err.startswith("error: model.moe.top_k = 9")


def test_ewa_merge_compares_moe_and_merged_ffn(capsys):
    assert ewa_merge.main(["configs/papers/ewa.yaml", "--set", "train.max_steps=20"]) == 0
    assert "merged FFN" in capsys.readouterr().out
