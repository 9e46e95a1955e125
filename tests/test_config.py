"""Typed configs (docs/design.md, Configs): strict parsing, YAML round trip, --set overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from moesaic.core.config import (
    Section,
    apply_overrides,
    dump_yaml,
    load_yaml,
    loads_yaml,
    parse,
    rule,
    to_dict,
    validate_tree,
)
from moesaic.core.errors import ConfigError
from moesaic.moe.layer import MoEConfig
from moesaic.moe.routing.base import ROUTERS
from moesaic.train.run_config import RunConfig, load_run_config

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Inner(Section):
    rate: float = rule(0.5, ge=0.0)
    names: list[str] = dataclasses.field(default_factory=lambda: ["a", "b", "c"])


@dataclasses.dataclass
class Outer(Section):
    steps: int = rule(3, ge=1)
    flag: bool = False
    inner: Inner = dataclasses.field(default_factory=Inner)
    blocks: list[Inner] = dataclasses.field(default_factory=lambda: [Inner(), Inner(rate=1.0)])


def test_yaml_round_trip_of_the_shipped_configs():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_run_config(path)
        again = validate_tree(parse(RunConfig, loads_yaml(dump_yaml(cfg)), ""), "")
        assert again == cfg, path.name
        assert to_dict(again) == to_dict(cfg)


def test_yaml_round_trip_of_every_router_config():
    for name in ROUTERS.names():
        moe = MoEConfig(router=ROUTERS.get(name).Config())
        assert parse(MoEConfig, loads_yaml(dump_yaml(moe)), "moe") == moe, name


def test_defaults_round_trip_and_generic_sections():
    o = Outer(steps=5, inner=Inner(rate=2.0, names=["x"]))
    assert parse(Outer, loads_yaml(dump_yaml(o))) == o


def test_overrides_scalars_nested_new_keys_and_list_indices():
    raw = {"steps": 3, "inner": {"rate": 0.5}, "blocks": [{"rate": 0.1}, {"rate": 0.2}]}
    apply_overrides(raw, ["steps=7", "inner.rate=1e-3", "inner.names=[p, q]", "blocks.1.rate=0.9",
                          "inner.names.0=z", "flag=true"])
    cfg = validate_tree(parse(Outer, raw))
    assert cfg.steps == 7 and cfg.flag is True
    assert cfg.inner.rate == 1e-3 and cfg.inner.names == ["z", "q"]
    assert [b.rate for b in cfg.blocks] == [0.1, 0.9]
    raw = {}
    apply_overrides(raw, ["inner.rate=2"])  # creates the section
    assert validate_tree(parse(Outer, raw)).inner.rate == 2.0


def test_overrides_on_a_run_config():
    cfg = load_run_config(REPO / "configs/toy_layer.yaml",
                          ["model.moe.top_k=1", "model.moe.router={kind: switch}", "train.lr=1e-4"])
    assert cfg.model.moe.top_k == 1 and cfg.model.moe.router.kind == "switch" and cfg.train.lr == 1e-4
    assert type(cfg.model.moe.router).__name__ == "SwitchRouterConfig"


@pytest.mark.parametrize("override,path", [
    ("steps", "--set"), ("=3", "--set"), ("inner..rate=1", "--set"), ("blocks.5.rate=1", "blocks.5"),
    ("blocks.x.rate=1", "blocks.x"), ("steps.sub=1", "steps"), ("inner.names.9=z", "inner.names"),
    ("inner.rate=[1, 2", "--set inner.rate"),
])
def test_bad_overrides(override, path):
    raw = {"steps": 3, "inner": {"names": ["a"]}, "blocks": [{"rate": 0.1}]}
    with pytest.raises(ConfigError) as e:
        apply_overrides(raw, [override])
    assert str(e.value).startswith(path)


@pytest.mark.parametrize("data,path,rule_text", [
    ({"steps": 2.0}, "steps", "integer"), ({"steps": True}, "steps", "integer"), ({"steps": "3"}, "steps", "integer"),
    ({"flag": 1}, "flag", "true or false"), ({"inner": [1]}, "inner", "mapping"),
    ({"inner": {"rate": "x"}}, "inner.rate", "number"), ({"inner": {"names": "a"}}, "inner.names", "list"),
    ({"inner": {"names": [1]}}, "inner.names.0", "string"), ({"stepz": 1}, "stepz", "did you mean 'steps'"),
    ({"steps": None}, "steps", "integer"),
])
def test_strict_parsing_names_the_field(data, path, rule_text):
    with pytest.raises(ConfigError) as e:
        parse(Outer, data)
    assert e.value.path == path and rule_text in str(e.value)


@pytest.mark.parametrize("data,path", [({"steps": 0}, "steps"), ({"inner": {"rate": -1}}, "inner.rate"),
                                       ({"inner": {"rate": float("nan")}}, "inner.rate"),
                                       ({"blocks": [{}, {"rate": float("inf")}]}, "blocks.1.rate")])
def test_declared_rules(data, path):
    with pytest.raises(ConfigError) as e:
        validate_tree(parse(Outer, data))
    assert e.value.path == path
    assert str(e.value).startswith(f"{path} = ")


def test_int_is_accepted_for_float_and_yaml_exponents_are_numbers():
    assert parse(Inner, {"rate": 2}).rate == 2.0 and isinstance(parse(Inner, {"rate": 2}).rate, float)
    assert loads_yaml("a: 1e-3\nb: -2E+2\nc: 1.5e3\nd: '1e3'\ne: 7") == {"a": 1e-3, "b": -200.0, "c": 1500.0,
                                                                         "d": "1e3", "e": 7}


def test_yaml_safety(tmp_path):
    with pytest.raises(ConfigError, match="duplicate key"):
        loads_yaml("a: 1\nb: 2\na: 3\n")
    with pytest.raises(ConfigError, match="duplicate key"):
        loads_yaml("outer:\n  x: 1\n  x: 1\n")
    with pytest.raises(ConfigError, match="tag"):
        loads_yaml("a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        loads_yaml("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}


def test_adamw_eps_below_the_float32_safe_floor_is_refused():
    """The config fuzzer's finding: ``train.eps: 5e-324`` passed the checker and diverged at step 2 (a gradient
    whose square underflows makes m / (sqrt(v) + eps) explode); it is now a ConfigError naming the field."""
    from moesaic.train.config import TrainConfig

    for bad in (5e-324, 1e-20, 0.0):
        with pytest.raises(ConfigError) as e:
            validate_tree(TrainConfig(eps=bad), "train")
        assert e.value.path == "train.eps" and ">= 1e-16" in str(e.value)
    validate_tree(TrainConfig(eps=1e-16), "train")
