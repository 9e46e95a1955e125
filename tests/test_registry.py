"""The Registry type itself: one name per Config, typed lookup errors, the default kind of a Config."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from moesaic.core.errors import RegistryError
from moesaic.core.registry import SCHEDULES
from moesaic.moe.dispatch.base import DISPATCHERS
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig
from moesaic.moe.routing.topk import TopKRouter, TopKRouterConfig


@dataclasses.dataclass
class _SharedConfig(RouterConfig):
    pass


class _A(Router):
    """Test router A."""

    Config = _SharedConfig


class _B(Router):
    """Test router B, with A's Config."""

    Config = _SharedConfig


@pytest.fixture
def cleanup() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for n in names:
        ROUTERS.remove(n)


def test_the_registration_names_the_config(cleanup: list[str]) -> None:
    cleanup.append("test_a")
    ROUTERS.register("test_a")(_A)
    assert _SharedConfig().kind == "test_a" and ROUTERS.config_of("test_a") is _SharedConfig
    assert TopKRouterConfig().kind == "topk" and RouterConfig().kind == ROUTERS.default == "topk"


def test_a_config_used_for_two_entries_is_refused(cleanup: list[str]) -> None:
    cleanup.append("test_a")
    ROUTERS.register("test_a")(_A)
    with pytest.raises(RegistryError, match="its Config _SharedConfig already belongs to 'test_a'"):
        ROUTERS.register("test_b")(_B)
    assert "test_b" not in ROUTERS


def test_a_name_registered_twice_is_refused(cleanup: list[str]) -> None:
    cleanup.append("test_a")
    ROUTERS.register("test_a")(_A)
    ROUTERS.register("test_a")(_A)  # the same object again: a no-op (modules imported twice)
    with pytest.raises(RegistryError, match="router 'topk' is registered twice"):
        ROUTERS.register("topk")(_A)
    assert ROUTERS.get("topk") is TopKRouter


def test_unknown_name_message_and_dotted_alias(cleanup: list[str]) -> None:
    with pytest.raises(RegistryError) as e:
        ROUTERS.get("swich")
    assert str(e.value).startswith("unknown router 'swich'; known: ") and "did you mean 'switch'?" in str(e.value)
    assert isinstance(e.value, KeyError)
    dotted = "moesaic.moe.routing.topk:TopKRouter"
    cleanup.append(dotted)
    assert ROUTERS.get(dotted) is TopKRouter
    assert TopKRouterConfig().kind == "topk"  # an alias does not rename the Config's kind


def test_dotted_path_of_the_wrong_kind() -> None:
    with pytest.raises(RegistryError, match="is not a dispatcher: must subclass moesaic.moe.dispatch.base.Dispatcher"):
        DISPATCHERS.get("moesaic.moe.routing.topk:TopKRouter")
    with pytest.raises(RegistryError, match="is not a schedule"):
        SCHEDULES.get("moesaic.core.schedules:ScheduleConfig")
