"""The public exact-accumulation functions (moesaic.train.exact_aux) in a loop of one's own: a no-grad pre-pass
for the batch totals, then each micro-batch's exact share from the layers' statistics after its forward(s).
Float64 brute force: the whole batch in one forward. No hook rewrites aux losses."""

import pytest
import torch

import moesaic
from moesaic.core.config import parse, validate_tree
from moesaic.models.regression import RegressionModel, RegressionModelConfig
from moesaic.train.exact_aux import AuxSplitError, aux_totals, global_aux

ROUTERS = {
    "switch_z": {"kind": "topk", "aux_loss_coef": 0.05, "z_loss_coef": 0.01},
    "cv2": {"kind": "noisy_topk", "noisy": False, "importance_coef": 0.1, "load_coef": 0.1, "init_std": 0.5},
    "sequence": {"kind": "topk", "balance_loss": "sequence", "aux_loss_coef": 0.05},
}


def _model(router):
    cfg = RegressionModelConfig(d_in=4, d_model=16, d_out=1)
    cfg.moe = parse(type(cfg.moe), {"d_ff": 32, "num_experts": 4, "top_k": 2, "router": router}, "model.moe")
    validate_tree(cfg, "model")
    torch.manual_seed(0)
    return RegressionModel(cfg).double()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, 4, generator=g, dtype=torch.float64)
    y = torch.randn(8, 5, 1, generator=g, dtype=torch.float64)
    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[1, 2:] = False
    mask[6, 1:] = False  # unequal real tokens per micro-batch
    return x, y, mask


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("name", list(ROUTERS))
def test_user_loop_micro_batches_equal_the_whole_batch(name):
    model = _model(ROUTERS[name])
    x, y, mask = _data()
    n = int(mask.sum())

    def task_sum(pred, yy, mm):
        return (((pred - yy) ** 2).squeeze(-1) * mm).sum()

    full = task_sum(model(x, mask=mask), y, mask) / n + moesaic.collect_aux_losses(model)
    full.backward()
    ref = _grads(model)

    micro = [(x[i:i + 2], y[i:i + 2], mask[i:i + 2]) for i in range(0, 8, 2)]
    def run(mb, aux):  # the forward(s) of one micro-batch; aux(model) after each
        model(mb[0], mask=mb[2])
        aux(model)

    totals = aux_totals(model, micro, run)
    loss_total = 0.0
    for i, (xx, yy, mm) in enumerate(micro):
        aux = totals.collector(i)
        loss = task_sum(model(xx, mask=mm), yy, mm) / n + aux(model)  # the share: no weighting
        loss.backward()
        loss_total += float(loss.detach())
    got = _grads(model)
    assert abs(loss_total - float(full.detach())) <= 1e-12
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-12, rtol=0, msg=k)
    assert float(ref["moe.router.weight"].abs().max()) > 1e-6
    assert not any(m._forward_hooks for m in model.modules())  # nothing rewrites the aux losses behind the loop


def test_two_forwards_per_micro_batch_have_their_own_totals():
    """Like THOR's two passes: each pass index has its own totals; the shares of pass 1 add up to the whole
    batch's aux of pass 1 and likewise for pass 2 (different inputs per pass)."""
    model = _model(ROUTERS["switch_z"])
    x, _, mask = _data()
    xb = x.flip(0)
    full = 0.0
    for inp in (x, xb):
        model(inp, mask=mask)
        full += float(moesaic.collect_aux_losses(model).detach())

    def run(i, aux):
        model(x[i:i + 2], mask=mask[i:i + 2])
        aux(model)
        model(xb[i:i + 2], mask=mask[i:i + 2])
        aux(model)

    idx = list(range(0, 8, 2))
    totals = aux_totals(model, idx, run)
    got = 0.0
    for j, i in enumerate(idx):
        aux = totals.collector(j)
        model(x[i:i + 2], mask=mask[i:i + 2])
        got += float(aux(model).detach())
        model(xb[i:i + 2], mask=mask[i:i + 2])
        got += float(aux(model).detach())
        with pytest.raises(AuxSplitError, match="forward 3 of this micro-batch has no pre-pass"):
            model(x[i:i + 2], mask=mask[i:i + 2])
            aux(model)
    assert abs(got - full) <= 1e-12


def test_global_aux_without_group_is_the_plain_aux():
    model = _model(ROUTERS["switch_z"])
    x, _, mask = _data()
    model(x, mask=mask)
    assert torch.equal(global_aux(None)(model), moesaic.collect_aux_losses(model))
