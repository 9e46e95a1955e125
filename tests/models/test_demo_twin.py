"""The demo's dense baseline has the MoE model's active parameters (routers excepted)."""

from moesaic.examples.demo import active_ffn_width, count_params, dense_twin
from moesaic.train.run_config import load_run_config


def test_dense_twin_matches_active_parameters():
    cfg = load_run_config("configs/demo.yaml", ["model.vocab_size=64", "model.d_model=32", "model.num_layers=3"])
    moe = cfg.model.build()
    dense = dense_twin(cfg).model.build()
    assert active_ffn_width(cfg.model.moe) == cfg.model.d_ff == 640
    total_m, active_m = count_params(moe)
    total_d, active_d = count_params(dense)
    assert total_d == active_d and total_m > 2 * total_d
    assert active_m == active_d  # routed top-k + shared experts = the dense FFN (routers not counted)
