import subprocess
import sys

import torch

import moesaic


def test_moe_layer_shapes_and_aux():
    layer = moesaic.moe_layer(d_model=16, d_ff=32, num_experts=4, top_k=2)
    for shape in [(10, 16), (2, 5, 16)]:
        x = torch.randn(*shape)
        y = layer(x)
        assert y.shape == x.shape
    assert float(moesaic.collect_aux_losses(layer).detach()) > 0


def test_cli_list_and_check(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moesaic", "list"], capture_output=True, text=True)
    assert out.returncode == 0 and "topk" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  kind: moe_regression\n  moe: {num_experts: 4, top_k: 9}\n")
    out = subprocess.run([sys.executable, "-m", "moesaic", "check", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: ")
    assert "model.moe.top_k = 9" in out.stderr
