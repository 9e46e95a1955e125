"""train.on_nonfinite (moesaic.train.nonfinite): NaN/inf injected into activations, a gradient and a weight is
detected before the optimizer step, named by step and layer, and handled by the policy: stop (typed error,
checkpoints untouched), skip_step (no update) and rollback (the run continues bitwise equal to an unbroken one
when the fault was transient)."""

import copy

import pytest
import torch

from moesaic.core.errors import NonFiniteTrainingError
from moesaic.train import checkpoint as ckpt
from moesaic.train import faults
from moesaic.train.run_config import load_run_config
from moesaic.train.trainer import Trainer


def _trainer(tiny_data, path, policy="stop", max_steps=8):
    d = copy.deepcopy(tiny_data)
    d["train"].update(max_steps=max_steps, save_every=4, eval_every=100, on_nonfinite=policy)
    return Trainer(load_run_config(data=d), path, log=lambda _m: None)


def _at_step(step, inject):
    """Call ``inject(trainer_step)`` at fault point step.begin of ``step`` (0-based) only, once."""
    done = []

    def cb(step: int, rank: int = 0, _s=step) -> None:
        if step == _s and not done:
            done.append(1)
            inject()
    return cb


def _nan_activations(model, layer="model.layers.1"):
    handle = []

    def hook(_m, _i, out):
        if not torch.is_grad_enabled():  # the exact-aux statistics pre-pass runs under no_grad
            return None
        handle[0].remove()
        return out * float("nan")
    # prepend: before the guard's hook, as a NaN made inside the layer would be
    return lambda: handle.append(model.get_submodule(layer).register_forward_hook(hook, prepend=True))


def _inf_gradient(model, name):
    p = dict(model.named_parameters())[name]
    handle = []

    def hook(g):
        handle[0].remove()
        return g * float("inf")
    return lambda: handle.append(p.register_hook(hook))


def test_stop_names_step_and_layer_for_activations(tiny_data, data_cache, tmp_path):
    t = _trainer(tiny_data, tmp_path / "run")
    with faults.installed("step.begin", _at_step(5, _nan_activations(t.model))), \
            pytest.raises(NonFiniteTrainingError, match=r"step 6: non-finite activations of layer model\.layers\.1 "):
        t.run()
    assert [s for s, _ in ckpt.list_steps(tmp_path / "run")] == [4]
    assert t.guard.nonfinite_weight() is None  # the optimizer never saw the NaN gradients


def test_stop_names_a_gradient_and_a_weight(tiny_data, data_cache, tmp_path):
    t = _trainer(tiny_data, tmp_path / "a")
    name = "lm_head.weight" if "lm_head.weight" in dict(t.model.named_parameters()) else \
        next(n for n, _ in t.model.named_parameters())
    with faults.installed("step.begin", _at_step(2, _inf_gradient(t.model, name))), \
            pytest.raises(NonFiniteTrainingError, match=rf"step 3: non-finite gradient of {name} "):
        t.run()
    t = _trainer(tiny_data, tmp_path / "b", policy="skip_step")
    w = next(p for n, p in t.model.named_parameters() if n.startswith("model.layers.0"))
    wname = next(n for n, p in t.model.named_parameters() if p is w)
    with faults.installed("step.begin", _at_step(1, lambda: w.data.view(-1)[0].fill_(float("inf")))), \
            pytest.raises(NonFiniteTrainingError, match=rf"step 2: non-finite weight {wname} .*cannot be skipped"):
        t.run()


def test_skip_step_leaves_the_weights_of_that_step(tiny_data, data_cache, tmp_path):
    t = _trainer(tiny_data, tmp_path / "run", policy="skip_step", max_steps=3)
    for _ in range(2):
        t.train_step(t.loader.next_batch(t.tc.batch_size))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    _nan_activations(t.model)()
    r = t.train_step(t.loader.next_batch(t.tc.batch_size))
    assert t.step == 3 and r["loss"] != r["loss"]  # the step counts, its loss was NaN
    assert all(torch.equal(before[n], p) for n, p in t.model.named_parameters())
    r = t.train_step(t.loader.next_batch(t.tc.batch_size))
    assert r["loss"] == r["loss"] and t.guard.nonfinite_weight() is None


def test_rollback_continues_bitwise_after_a_transient_fault(tiny_data, data_cache, tmp_path):
    ref = _trainer(tiny_data, tmp_path / "ref", policy="rollback")
    assert ref.run() == 0
    t = _trainer(tiny_data, tmp_path / "run", policy="rollback")
    with faults.installed("step.begin", _at_step(6, _nan_activations(t.model))):
        assert t.run() == 0
    assert t._rolled_back == {7}
    for (n, a), b in zip(ref.model.state_dict().items(), t.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert (tmp_path / "ref" / "step-00000008" / "model.safetensors").read_bytes() == \
        (tmp_path / "run" / "step-00000008" / "model.safetensors").read_bytes()


def test_rollback_without_a_checkpoint_or_twice_stops(tiny_data, data_cache, tmp_path):
    t = _trainer(tiny_data, tmp_path / "run", policy="rollback")
    with faults.installed("step.begin", _at_step(1, _nan_activations(t.model))), \
            pytest.raises(NonFiniteTrainingError, match="step 2: .*no checkpoint to roll back to"):
        t.run()
    t = _trainer(tiny_data, tmp_path / "b", policy="rollback")

    def always(step: int, rank: int = 0) -> None:
        if step == 5:
            _nan_activations(t.model)()
    with faults.installed("step.begin", always), pytest.raises(NonFiniteTrainingError, match="step 6: .*failed again"):
        t.run()
