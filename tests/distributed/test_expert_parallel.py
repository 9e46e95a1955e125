"""Expert parallelism on real gloo processes vs one process on the same global batch (docs/parallel.md): losses,
parameters, dispatcher outputs, gradients and counts. One spawn per world size runs every case; the tests read
its results."""

import dataclasses

import pytest
import torch

from moesaic.distributed.launch import spawn
from moesaic.train.ep_equivalence import Case, ep_worker, run

ROUTER = {"expert_bias": True, "bias_update_rate": 0.01, "z_loss_coef": 1e-3}
VALID = {"unequal": {2: [6, 0], 4: [6, 0, 3, 5]}, "sequence": {2: [0, 16], 4: [16, 3, 0, 9]}}


def cases(W):
    return {
        "fp64": Case(steps=50, router=ROUTER),
        "fp32": Case(dtype="float32", steps=10, router=ROUTER),
        # a rank with zero valid tokens and every token to experts 0 and 1 (tied scores); sigmoid scores,
        # Switch balance and the device-level loss over 2 groups
        "unequal": Case(steps=5, zero_router=True, valid_per_rank=VALID["unequal"][W],
                        router={"score_func": "sigmoid", "device_groups": 2, "device_loss_coef": 0.05}),
        # the sequence-wise balance loss, top-1, with an empty rank
        "sequence": Case(steps=5, top_k=1, valid_per_rank=VALID["sequence"][W],
                         router={"balance_loss": "sequence", "z_loss_coef": 1e-3, "normalization": "none"}),
    }


_REF: dict = {}


def reference(W):
    if W not in _REF:
        _REF[W] = {name: run(case) for name, case in cases(W).items()}
    return _REF[W]


@pytest.fixture(scope="module")
def spawned():
    """One set of 4 processes: EP=2 in two independent sub-worlds (ranks 0-1 and 2-3: a rerun in other
    processes), then EP=4 (with a second fp32 run)."""
    jobs = {}
    for W in (2, 4):
        jobs.update({(W, n): c for n, c in cases(W).items()})
        jobs[W, "indivisible"] = Case(num_experts=2 * W + 1, steps=0)
    jobs[4, "fp32_again"] = cases(4)["fp32"]
    jobs[4, "emulated"] = cases(4)["unequal"]  # the all-gather fallback, on the unequal loads
    # backend auto: ranks 2-3 receive no rows and run the `active` backend, whose output does not depend on
    # its (empty) input; both backward exchanges must still run on every rank (no collective mismatch)
    jobs[4, "unequal_auto"] = dataclasses.replace(cases(4)["unequal"], backend="auto")
    return spawn(ep_worker, 4, jobs)


@pytest.fixture(params=[2, 4], ids=["ep2", "ep4"])
def ep(request, spawned):
    W = request.param
    res = [{name: v for (size, name), v in spawned[r].items() if size == W} for r in range(W)]
    if W == 2:  # the other sub-world's ranks ran the same EP=2 jobs
        for r in range(2):
            res[r].update({f"{name}_again": v for (size, name), v in spawned[r + 2].items() if size == 2})
    return W, res, reference(W)


def rel(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item()


pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(240)]


def test_fp64_loss_every_step_and_final_params(ep):
    W, res, reference = ep
    ref = reference["fp64"]
    for r in range(W):
        assert len(res[r]["fp64"]["loss"]) == 50
        assert rel(res[r]["fp64"]["loss"], ref["loss"]) <= 1e-10
        assert max(abs(a - b) for a, b in zip(res[r]["fp64"]["aux"], ref["aux"])) <= 1e-10 * max(ref["aux"])
        assert res[r]["fp64"]["nonfinite"] == 0
    # final expert shards and dense params; aux-loss-free bias moved identically on every rank
    for r in range(W):
        off, L = res[r]["fp64"]["shard"]
        for n, p in res[r]["fp64"]["params"].items():
            want = ref["params"][n][off:off + L] if n in res[r]["fp64"]["expert_names"] else ref["params"][n]
            assert (p - want).abs().max() <= 1e-9, n
        assert torch.equal(res[r]["fp64"]["expert_bias"], ref["expert_bias"])
    assert ref["expert_bias"].abs().sum() > 0  # the bias really moved


def test_fp32_first_10_steps(ep):
    W, res, reference = ep
    assert rel(res[0]["fp32"]["loss"], reference["fp32"]["loss"]) <= 1e-6


def test_reruns_bitwise_equal(ep):
    W, res, reference = ep
    for r in range(W):
        if W == 2:
            for name in ("fp64", "unequal", "sequence"):
                assert res[r][name]["loss"] == res[r][f"{name}_again"]["loss"]
        assert res[r]["fp32"]["loss"] == res[r]["fp32_again"]["loss"]
        for n, p in res[r]["fp32"]["params"].items():
            assert torch.equal(p, res[r]["fp32_again"]["params"][n]), n


@pytest.mark.parametrize("name", ["fp64", "unequal", "sequence"])
def test_dispatcher_equivalence_outputs_grads_counts(ep, name):
    """The all-to-all dispatcher vs the local sort dispatcher on the global batch, fp64."""
    W, res, reference = ep
    ref = reference[name]
    per = cases(W)[name].batch // W
    for r in range(W):
        got = res[r][name]
        off, L = got["shard"]
        assert (got["pred0"] - ref["pred0"][r * per:(r + 1) * per]).abs().max() <= 1e-12
        for n, g in got["grads0"].items():
            want = ref["grads0"][n][off:off + L] if n in got["expert_names"] else ref["grads0"][n]
            assert (g - want).abs().max() <= 1e-12, n
        for step, c in enumerate(got["counts"]):  # rows each local expert received, every step
            assert torch.equal(c, ref["counts"][step][off:off + L]), (r, step)
        assert rel(got["loss"], ref["loss"]) <= 1e-10


def test_unequal_loads_really_unequal(ep):
    W, res, reference = ep
    c0 = reference["unequal"]["counts"][0]
    assert c0[2:].sum() == 0 and c0[0] > 0  # every token on experts 0 and 1
    assert reference["unequal"]["aux"][0] > 0


def test_gradient_groups(ep):
    W, res, reference = ep
    red = res[0]["fp64"]["reduced"]
    assert red["edp"] == ["moe.experts.w_up_EHD", "moe.experts.w_down_EDF"]
    assert "moe.router.weight" in red["dp"] and not set(red["dp"]) & set(red["edp"])


def test_indivisible_experts_error_names_layer(ep):
    W, res, reference = ep
    msg = res[0]["indivisible"]
    assert msg is not None and "moe.num_experts" in msg and f"({W})" in msg


def test_all_gather_fallback_matches(spawned):
    """The all-gather emulation of the exchange (EP=4, unequal loads) equals the one-process reference."""
    ref = reference(4)["unequal"]
    for r in range(4):
        got = spawned[r][4, "emulated"]
        assert rel(got["loss"], ref["loss"]) <= 1e-10
        off, L = got["shard"]
        for step, c in enumerate(got["counts"]):
            assert torch.equal(c, ref["counts"][step][off:off + L])
        for n, g in got["grads0"].items():
            want = ref["grads0"][n][off:off + L] if n in got["expert_names"] else ref["grads0"][n]
            assert (g - want).abs().max() <= 1e-12, n


def test_rank_without_rows_and_input_independent_backend(spawned):
    ref = run(dataclasses.replace(cases(4)["unequal"], backend="auto"))
    assert ref["counts"][0][2:].sum() == 0
    for r in range(4):
        got = spawned[r][4, "unequal_auto"]
        assert rel(got["loss"], ref["loss"]) <= 1e-10
        off, L = got["shard"]
        for n, g in got["grads0"].items():
            want = ref["grads0"][n][off:off + L] if n in got["expert_names"] else ref["grads0"][n]
            assert (g - want).abs().max() <= 1e-12, n
