"""Exact aux accumulation (docs/training.md, "Loss under accumulation and padding"): with
``train.aux_accumulation: exact`` (the default), gradient accumulation 4 x 2 equals batch 8 in float64 (step
loss, aux loss and every parameter gradient within 1e-12) for batch-statistic balance losses too, with unequal
valid tokens per micro-batch. The definition is in moesaic/train/loss.py, the mechanism in
moesaic/train/exact_aux.py."""

import copy

import pytest
import torch

import moesaic
from lm_fixtures import accumulate_grads, padded_lm_batch
from moesaic.moe.routing import losses
from moesaic.train.loss import IGNORE_INDEX, lm_loss_sum
from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer

ROUTERS = {
    "topk_switch_z": ({"kind": "topk", "aux_loss_coef": 0.05, "z_loss_coef": 0.01}, 2),
    "topk_bias_switch": ({"kind": "topk", "expert_bias": True, "aux_loss_coef": 0.05}, 2),  # loads counted once
    "topk_sequence": ({"kind": "topk", "balance_loss": "sequence", "aux_loss_coef": 0.05, "z_loss_coef": 0.01}, 2),
    "topk_device_sigmoid": ({"kind": "topk", "score_func": "sigmoid", "aux_loss_coef": 0.05, "device_groups": 2,
                             "device_loss_coef": 0.1, "z_loss_coef": 0.01}, 2),
    "switch": ({"kind": "switch", "jitter_eps": 0.0, "aux_loss_coef": 0.05, "z_loss_coef": 0.01}, 1),
    "gshard": ({"kind": "gshard", "aux_loss_coef": 0.05, "second_expert_policy": "all"}, 2),
    "noisy_topk_cv2": ({"kind": "noisy_topk", "noisy": False, "importance_coef": 0.1, "load_coef": 0.1,
                        "init_std": 0.5, "z_loss_coef": 0.01}, 2),
    "top_p": ({"kind": "top_p", "aux_loss_coef": 0.05, "dynamic_loss_coef": 0.01, "z_loss_coef": 0.01,
               "balance_normalization": "tokens"}, 2),
    "moepp_zero_computation": ({"kind": "moepp", "zero_computation_experts": 2, "aux_loss_coef": 0.05,
                                "z_loss_coef": 0.01}, 2),
    "latency_aware_cv2": ({"kind": "latency_aware", "aux_loss_coef": 0.05, "noise_std": 0.0,
                           "latency": [1.0, 2.0, 1.0, 3.0]}, 2),
}


def _trainer(tiny_data, path, ga, router, top_k=2, **train):
    d = copy.deepcopy(tiny_data)
    d["model"]["moe"].update(router=router, top_k=top_k)
    if router["kind"] == "moepp":  # zero-computation experts (MoE++)
        d["model"]["moe"]["experts"] = {"kind": "moepp", "num_constant": 1, "num_copy": 1, "num_zero": 0}
    d["train"].update(batch_size=8, grad_accum=ga, dtype="float64", grad_clip=0.0, **train)
    return Trainer(load_run_config(data=d), path)


def _batch(vocab):  # micro-batches of 2 rows: 18, 32, 8, 23 tokens
    return padded_lm_batch(vocab, 11, [16, 2, 16, 16, 7, 1, 10, 13], (2, slice(3, 9)))


_grads = accumulate_grads


def _pair(tiny_data, tmp_path, name, ga, **train):
    router, k = ROUTERS[name]
    t1 = _trainer(tiny_data, tmp_path / f"{name}1", 1, router, k, **train)
    tg = _trainer(tiny_data, tmp_path / f"{name}{ga}", ga, router, k, **train)
    tg.model.load_state_dict(t1.model.state_dict())
    return t1, tg


def _max_grad_diff(g1, g2):
    assert g1.keys() == g2.keys()
    return max(float((g1[n] - g2[n]).abs().max()) for n in g1)


NO_PREPASS_MISMATCH = pytest.mark.filterwarnings("error:.*routing differed between the aux pre-pass")


@NO_PREPASS_MISMATCH
@pytest.mark.parametrize("name", list(ROUTERS))
def test_ga_4x2_equals_batch_8_batch_statistic_aux(tiny_data, data_cache, tmp_path, name):
    t1, t4 = _pair(tiny_data, tmp_path, name, 4)
    assert t4.aux_acc.prepass and not t1.aux_acc.prepass  # batch 8 pays nothing
    batch = _batch(t1.data.vocab_size)
    (r1, g1), (r4, g4) = _grads(t1, batch), _grads(t4, batch)
    assert r4["aux_loss"] > 1e-3
    assert abs(r1["loss"] - r4["loss"]) <= 1e-12
    assert abs(r1["aux_loss"] - r4["aux_loss"]) <= 1e-12
    assert _max_grad_diff(g1, g4) <= 1e-12
    for a, b in zip(moesaic.moe_layers(t1.model), moesaic.moe_layers(t4.model)):
        if hasattr(a.router, "step_load"):  # aux-loss-free bias: the pre-pass restores the step's loads
            assert a.router.step_load.sum() > 0 and torch.equal(a.router.step_load, b.router.step_load)
    router_grads = [g4[n] for n in g4 if "router" in n]
    assert router_grads and max(float(g.abs().max()) for g in router_grads) > 1e-6  # the aux reaches the router


@NO_PREPASS_MISMATCH
@pytest.mark.parametrize("name", ["topk_switch_z", "noisy_topk_cv2", "topk_sequence"])
def test_all_padding_micro_batch(tiny_data, data_cache, tmp_path, name):
    """A micro-batch with no real token (share 0, with a graph) next to unequal ones."""
    t1, t4 = _pair(tiny_data, tmp_path, name, 4)
    batch = _batch(t1.data.vocab_size)
    batch["attention_mask"][2:4] = 0
    batch["labels"][2:4] = IGNORE_INDEX
    (r1, g1), (r4, g4) = _grads(t1, batch), _grads(t4, batch)
    assert abs(r1["loss"] - r4["loss"]) <= 1e-12 and abs(r1["aux_loss"] - r4["aux_loss"]) <= 1e-12
    assert _max_grad_diff(g1, g4) <= 1e-12


def test_micro_batch_mode_differs(tiny_data, data_cache, tmp_path):
    """The old per-micro-batch definition is not batch 8 (so the exact tests can fail)."""
    t1, t4 = _pair(tiny_data, tmp_path, "topk_switch_z", 4, aux_accumulation="micro_batch")
    assert not t4.aux_acc.prepass
    batch = _batch(t1.data.vocab_size)
    (r1, g1), (r4, g4) = _grads(t1, batch), _grads(t4, batch)
    assert abs(r1["loss"] - r4["loss"]) <= 1e-12  # the LM loss is exact either way
    assert abs(r1["aux_loss"] - r4["aux_loss"]) > 1e-5
    assert _max_grad_diff(g1, g4) > 1e-7


@NO_PREPASS_MISMATCH
def test_thor_two_passes_exact(tiny_data, data_cache, tmp_path):
    """THOR's step (two passes per micro-batch) with a Switch balance loss: one total per pass."""
    t1, t4 = _pair(tiny_data, tmp_path, "topk_switch_z", 4, objective={"kind": "thor", "alpha": 1.0})
    batch = _batch(t1.data.vocab_size)
    (r1, g1), (r4, g4) = _grads(t1, batch), _grads(t4, batch)
    assert abs(r1["aux_loss"] - r4["aux_loss"]) <= 1e-12 and r4["aux_loss"] > 1e-3
    assert _max_grad_diff(g1, g4) <= 1e-12


@NO_PREPASS_MISMATCH
def test_stochastic_router_prepass_keeps_rng_stream(tiny_data, data_cache, tmp_path):
    """Noisy top-k with noise: the pre-pass must not move the RNG. Reference: the same four micro-batch
    forwards from the same RNG state, the importance CV^2 of the *summed* gates (brute force, no
    moesaic.moe.routing.aux_stats), LM loss / N and token-weighted z-loss; the RNG after the step equals the
    micro_batch mode's (no draw consumed twice), and reruns are bitwise equal."""
    router = {"kind": "noisy_topk", "importance_coef": 0.1, "load_coef": 0.0, "init_std": 0.5, "z_loss_coef": 0.01}
    t4 = _trainer(tiny_data, tmp_path / "noisy", 4, router)
    assert t4.aux_acc.prepass
    batch = _batch(t4.data.vocab_size)
    N, T = int((batch["labels"] != IGNORE_INDEX).sum()), int(batch["attention_mask"].sum())
    torch.manual_seed(123)
    r4, g4 = _grads(t4, batch)
    rng_exact = torch.get_rng_state()

    torch.manual_seed(123)  # brute force on the same model and draws
    gates, layers = {}, moesaic.moe_layers(t4.model)
    hooks = [lay.router.register_forward_hook(lambda m, a, d, i=i: gates.setdefault(i, []).append(d.dense()))
             for i, lay in enumerate(layers)]
    ce, z = 0.0, 0.0
    for i in range(0, 8, 2):
        mb = {k: v[i:i + 2] for k, v in batch.items()}
        logits = t4.model(mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        ce = ce + lm_loss_sum(logits, mb["labels"])[0] / N
        z = z + moesaic.collect_aux_losses(t4.model, by_name=True)["z"] * int(mb["attention_mask"].sum()) / T
    for h in hooks:
        h.remove()
    imp = sum(0.1 * losses.cv_squared(torch.cat(gs).sum(0)) for gs in gates.values())
    (ce + z + imp).backward()
    assert abs(float(ce.detach()) - r4["loss"]) <= 1e-12
    assert abs(float((z + imp).detach()) - r4["aux_loss"]) <= 1e-12
    for n, p in t4.model.named_parameters():
        torch.testing.assert_close(g4[n], p.grad, atol=1e-12, rtol=0, msg=n)
    t4.opt.zero_grad(set_to_none=True)

    tm = _trainer(tiny_data, tmp_path / "noisy_mb", 4, router, aux_accumulation="micro_batch")
    tm.model.load_state_dict(t4.model.state_dict())
    torch.manual_seed(123)
    _grads(tm, batch)
    assert torch.equal(torch.get_rng_state(), rng_exact)

    runs = []
    for j in range(2):
        t = _trainer(tiny_data, tmp_path / f"noisy_rerun{j}", 4, router)
        torch.manual_seed(5)
        runs.append([t.train_step(t.loader.next_batch(8)) for _ in range(3)])
    assert [(r["loss"], r["aux_loss"]) for r in runs[0]] == [(r["loss"], r["aux_loss"]) for r in runs[1]]


def test_prepass_only_where_a_loss_needs_batch_totals(tiny_data, data_cache, tmp_path):
    """Every router aux loss is a statistic (RoutingDecision.aux_stats), so exact mode accepts any router; the
    pre-pass runs only with grad_accum > 1 and a loss other than the z-loss (a token mean needs no totals)."""
    router, k = ROUTERS["topk_switch_z"]
    assert _trainer(tiny_data, tmp_path / "exact", 4, router, k).aux_acc.prepass
    assert not _trainer(tiny_data, tmp_path / "mb", 4, router, k, aux_accumulation="micro_batch").aux_acc.prepass
    assert not _trainer(tiny_data, tmp_path / "ga1", 1, router, k).aux_acc.prepass
    z_only = {"kind": "topk", "aux_loss_coef": 0.0, "z_loss_coef": 0.01}  # token means need no pre-pass
    assert not _trainer(tiny_data, tmp_path / "z", 4, z_only, k).aux_acc.prepass


def _ep_worker(rank, world, tiny_data, root, names):
    """Expert parallelism 2 x gradient accumulation 2 (the trainer's expert + data parallel strategy) on gloo:
    one step's gradients."""

    out = {}
    for name in names:
        router, k = ROUTERS[name]
        d = copy.deepcopy(tiny_data)
        d["model"]["moe"].update(router=router, top_k=k)
        d["train"].update(batch_size=8, grad_accum=2, dtype="float64", grad_clip=0.0)
        d["parallel"] = {"ep_size": world}
        t = Trainer(load_run_config(data=d), f"{root}/{name}")
        r, g = _grads(t, _batch(t.data.vocab_size))
        shards = {n: layer.experts.ep_shard.offset for n, layer in
                  ((lay.layer_name, lay) for lay in moesaic.moe_layers(t.model))}
        out[name] = {"r": r, "g": g, "offset": shards, "prepass": t.aux_acc.prepass}
    return out


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(240)
@NO_PREPASS_MISMATCH
def test_ep2_times_ga2_equals_one_process_batch_8(tiny_data, data_cache, tmp_path):
    """EP + GA: the pre-pass totals are all-reduced over the ranks once; every rank's dense gradients and its
    expert shard's gradients equal one process at batch 8 (1e-12)."""
    from moesaic.distributed.launch import spawn

    names = ["topk_switch_z", "noisy_topk_cv2", "topk_sequence"]
    res = spawn(_ep_worker, 2, tiny_data, str(tmp_path / "ep"), names)
    for name in names:
        router, k = ROUTERS[name]
        t1 = _trainer(tiny_data, tmp_path / f"ref_{name}", 1, router, k)
        r1, g1 = _grads(t1, _batch(t1.data.vocab_size))
        for rank in range(2):
            got = res[rank][name]
            assert got["prepass"]
            assert abs(got["r"]["loss"] - r1["loss"]) <= 1e-12
            assert abs(got["r"]["aux_loss"] - r1["aux_loss"]) <= 1e-12
            assert got["g"].keys() >= g1.keys()
            for n in got["g"].keys() - g1.keys():  # filled with zeros by the gradient all-reduce (unused weights)
                assert not got["g"][n].any(), n
            for n, ref in g1.items():
                g = got["g"][n]
                if g.shape != ref.shape:  # an expert weight: this rank's slice of the experts
                    layer = next(lay for lay in got["offset"] if n.startswith(lay + "."))
                    ref = ref[got["offset"][layer]:got["offset"][layer] + g.shape[0]]
                torch.testing.assert_close(g, ref, atol=1e-12, rtol=0, msg=f"{name} rank {rank} {n}")


@NO_PREPASS_MISMATCH
def test_classifier_ga_2x2_equals_batch_4_switch_balance(tmp_path, data_cache):
    """The sequence-classification task (encoder, one label per sequence) under exact accumulation."""
    from genre_fixtures import tiny_genre

    def make(ga):
        d = tiny_genre(train={"batch_size": 4, "grad_accum": ga, "dtype": "float64", "grad_clip": 0.0})
        d["model"]["moe"]["router"] = ROUTERS["topk_switch_z"][0]
        return Trainer(load_run_config(data=d), tmp_path / f"cls{ga}")

    t1, t2 = make(1), make(2)
    t2.model.load_state_dict(t1.model.state_dict())
    assert t2.aux_acc.prepass
    batch = t1.loader.next_batch(4)
    batch["labels"][1] = IGNORE_INDEX
    (r1, g1), (r2, g2) = _grads(t1, batch), _grads(t2, batch)
    assert r2["aux_loss"] > 1e-3
    assert abs(r1["loss"] - r2["loss"]) <= 1e-12 and abs(r1["aux_loss"] - r2["aux_loss"]) <= 1e-12
    assert _max_grad_diff(g1, g2) <= 1e-12
