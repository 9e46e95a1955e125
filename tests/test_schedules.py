"""Schedules (src/moesaic/core/schedules.py): SMoE-Dropout k modes (Chen et al. 2023), EvoMoE temperature
(Nie et al. 2021)."""

import math

import pytest
import torch

import moesaic
from moesaic.core.config import parse, validate_tree
from moesaic.core.errors import ConfigError
from moesaic.core.registry import SCHEDULES
from moesaic.core.schedules import ScheduleConfig, schedule


def _smoe_reference(mode, s, S, lo, hi):
    """The original ``calculate_gate_number`` (new_utils.py), re-derived from its formulas, for s <= S."""
    if mode == "linear_increase":
        g = round((hi - lo) * s / S) + lo
    elif mode == "linear_decrease":
        g = round((lo - hi) * s / S) + hi
    elif mode == "cosine_decrease":
        g = round((hi - lo) * math.cos(math.pi * s / (2 * S))) + lo
    elif mode == "cosine_increase":
        g = round((lo - hi) * math.cos(math.pi * s / (2 * S))) + hi
    elif mode == "exp_increase":
        g = round((lo - hi) * 0.99 ** (s // (S // 300))) + hi
    else:
        vals = [1, 2, 4, 8, 16] if mode == "multi_step_increase" else [16, 8, 4, 2, 1]
        g = vals[int(len(vals) * s / S)]
    return min(max(g, lo), hi)


MODES = ["linear_increase", "linear_decrease", "cosine_increase", "cosine_decrease", "exp_increase",
         "multi_step_increase", "multi_step_decrease"]


def _k_schedule(mode, lo=8, hi=16, S=400_000):
    if mode.startswith("multi_step"):
        return schedule(mode, min_value=lo, max_value=hi, total_steps=S)
    return schedule(mode, min_value=lo, max_value=hi, total_steps=S, integer=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lo,hi", [(8, 16), (1, 16), (2, 16)])
def test_matches_original_formula(mode, lo, hi):
    S = 400_000
    sch = _k_schedule(mode, lo, hi, S)
    steps = [0, 1, 999, 25_000, 50_000, 99_999, 133_333, 200_000, 250_001, 333_333, 399_999]
    for s in steps:
        assert sch.value(s) == _smoe_reference(mode, s, S, lo, hi), (mode, s)


def test_golden_values():
    # The SMoE-Dropout Transformer-XL script's setting: E = 16, k from 8 to 16 over 400k steps.
    lin = _k_schedule("linear_increase")
    assert [lin.value(s) for s in (0, 100_000, 200_000, 400_000, 10**7)] == [8, 10, 12, 16, 16]
    cos_inc = _k_schedule("cosine_increase")
    assert cos_inc.value(200_000) == 10  # round(-8 cos(pi/4)) + 16 = -6 + 16
    cos_dec = _k_schedule("cosine_decrease")
    assert cos_dec.value(200_000) == 14  # round(8 cos(pi/4)) + 8
    ms = schedule("multi_step_increase", total_steps=100)
    assert [ms.value(s) for s in (0, 19, 20, 40, 60, 80, 99, 100, 500)] == [1, 1, 2, 4, 8, 16, 16, 16, 16]
    half_even = schedule("linear_increase", min_value=1, max_value=2, total_steps=2, integer=True)
    assert half_even.value(1) == 1  # round(0.5) = 0 (half to even, like the original)


@pytest.mark.parametrize("mode", MODES)
def test_endpoints_monotone_and_clamped(mode):
    S = 3000
    sch = _k_schedule(mode, 2, 16, S)
    vals = [sch.value(s) for s in range(0, 2 * S + 1, 7)]
    inc = "increase" in mode
    assert all((b >= a) if inc else (b <= a) for a, b in zip(vals, vals[1:]))
    if mode.startswith("multi_step"):
        assert sch.value(0) == (2 if inc else 16) and sch.value(S) == (16 if inc else 2)
    else:
        assert sch.value(0) == (2 if inc else 16)
        if mode == "exp_increase":  # 0.99^300 = 0.049: not at hi at S (as in the original); reaches it later
            assert sch.value(S) == 15 and sch.value(2 * S) == 16 and sch.value(10**9) == 16
            return
        assert sch.value(S) == (16 if inc else 2)
    assert sch.value(S) == sch.value(5 * S) == sch.value(10**9)


def test_exp_decay_temperature():
    sch = schedule("exp_decay", max_value=2.0, min_value=0.3, decay_steps=1000)
    assert sch.value(0) == 2.0
    assert sch.value(500) == pytest.approx(2.0 * math.sqrt(0.3 / 2.0))
    assert sch.value(1000) == pytest.approx(0.3)
    assert sch.value(10**6) == 0.3
    vals = [sch.value(s) for s in range(0, 3000, 13)]
    assert all(b <= a for a, b in zip(vals, vals[1:]))
    lin = schedule("linear_decrease", max_value=2.0, min_value=0.3, total_steps=1000)  # EvoMoE linear
    assert lin.value(0) == 2.0 and lin.value(500) == pytest.approx(1.15) and lin.value(5000) == 0.3


def test_constant_and_registry():
    assert schedule("constant", constant=3.5).value(12345) == 3.5
    for name in MODES + ["constant", "exp_decay"]:
        assert name in SCHEDULES
        assert SCHEDULES.get(name).Config().kind == name


def test_step_state_survives_state_dict():
    model = torch.nn.Module()
    model.sch = _k_schedule("linear_increase", 2, 16, 100)
    assert model.sch.value() == 2
    moesaic.on_optimizer_step(model, 50)
    assert model.sch.value() == 9 and int(model.sch.step) == 50
    sd = model.state_dict()
    assert "sch.step" in sd
    fresh = torch.nn.Module()
    fresh.sch = _k_schedule("linear_increase", 2, 16, 100)
    assert fresh.sch.value() == 2
    fresh.load_state_dict(sd)
    assert fresh.sch.value() == 9 and fresh.sch.current_step == 50


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="schedule.min_value"):
        schedule("linear_increase", min_value=5, max_value=2)
    with pytest.raises(ConfigError, match="schedule.total_steps"):
        schedule("linear_increase", total_steps=0)
    with pytest.raises(ConfigError, match="schedule.values"):
        schedule("multi_step_increase", values=[4, 2])
    with pytest.raises(ConfigError, match="did you mean 'linear_increase'"):
        schedule("linear_increas")
    with pytest.raises(ConfigError, match="schedule.min_valu"):
        validate_tree(parse(ScheduleConfig, {"kind": "exp_decay", "min_valu": 1}, "schedule"), "schedule")


def test_step_restored_by_in_place_copy():
    """Checkpoint loaders may copy tensors into ``state_dict()`` in place (no load hooks): still seen."""
    a, b = _k_schedule("linear_increase", 2, 16, 100), _k_schedule("linear_increase", 2, 16, 100)
    a.on_optimizer_step(50)
    assert b.value() == 2
    with torch.no_grad():
        for n, t in a.state_dict().items():
            b.state_dict()[n].copy_(t)
    assert b.value() == 9 and b.current_step == 50
