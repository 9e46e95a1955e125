"""Out-of-tree plugins (docs/design.md, "Registries and plugins"): a router by dotted path in YAML and by the
``moesaic.plugins`` entry point of a real package that the tests install (tests/plugin_pkg, into a temporary
folder, offline); the one-file router example; a typed error for every broken dotted path."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lm_fixtures import TINY
from moesaic.core.config import ConfigError, to_dict
from moesaic.moe.routing.base import ROUTERS
from moesaic.train.run_config import load_run_config

PKG = Path(__file__).parent / "plugin_pkg"
# The tiny Shakespeare LM of the CLI tests, 3 steps of 2 micro-batches (batch-statistic aux losses then
# take the exact accumulation path).
TOY = copy.deepcopy(TINY)
TOY["train"].update(max_steps=3, eval_every=100, save_every=3)

# The one-file router of docs/design.md ("Adding a router in one file"), read from the page itself so the
# documented example is the one that trains here.
_DESIGN = (Path(__file__).parents[1] / "docs" / "design.md").read_text()
ONE_FILE_ROUTER = _DESIGN.split("<!-- one-file-router", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def _run(args: list[str], cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "moesaic", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _write(path: Path, router: dict[str, object]) -> Path:
    cfg = copy.deepcopy(TOY)
    cfg["model"]["moe"]["router"] = router
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """tests/plugin_pkg installed (wheel built locally, no index, no dependencies) into a fresh folder."""
    root = tmp_path_factory.mktemp("plugin")
    src = shutil.copytree(PKG, root / "src")  # the build writes build/ and egg-info next to the sources
    target = root / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                          "--no-build-isolation", "--disable-pip-version-check", "--target", str(target), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    eps = list(target.glob("moesaic_test_plugin-*.dist-info/entry_points.txt"))
    assert eps and "moesaic.plugins" in eps[0].read_text()
    return target


def test_entry_point_plugin_by_name_loads_lazily_once(plugin_dir: Path, tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys
        import moesaic
        from moesaic.moe.routing.base import ROUTERS
        assert "moesaic_test_plugin.routers" not in sys.modules  # nothing imported before the first lookup
        assert "plugin_lowest" in ROUTERS.names()
        print(ROUTERS.describe("plugin_lowest"))
        """)
    env = {**os.environ, "PYTHONPATH": str(plugin_dir)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Plugin test router: the k experts of LOWEST score")


def test_entry_point_router_trains_and_checks_through_the_cli(plugin_dir: Path, tmp_path: Path) -> None:
    cfg = _write(tmp_path / "by_name.yaml", {"kind": "plugin_lowest", "temperature": 2.0})
    assert _run(["check", str(cfg)], tmp_path, plugin_dir).returncode == 0
    res = _run(["train", str(cfg), "--out", str(tmp_path / "run")], tmp_path, plugin_dir)
    assert res.returncode == 0, res.stderr
    listed = _run(["list"], tmp_path, plugin_dir)
    assert "plugin_lowest" in listed.stdout
    without = _run(["check", str(cfg)], tmp_path, tmp_path)  # not installed: an unknown router
    assert without.returncode == 2 and "model.moe.router.kind = 'plugin_lowest': unknown router" in without.stderr


def test_dotted_path_router_trains_and_its_saved_config_round_trips(plugin_dir: Path, tmp_path: Path) -> None:
    kind = "moesaic_test_plugin.extra:FirstExpertRouter"
    cfg = _write(tmp_path / "dotted.yaml", {"kind": kind})
    res = _run(["train", str(cfg), "--out", str(tmp_path / "run")], tmp_path, plugin_dir)
    assert res.returncode == 0, res.stderr
    saved = list((tmp_path / "run").rglob("*.yaml"))
    assert saved, "the run saves its config"
    for path in saved:
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "model" in data:
            assert data["model"]["moe"]["router"]["kind"] == kind
            assert _run(["check", str(path)], tmp_path, plugin_dir).returncode == 0


def test_one_file_router_example_trains_from_yaml(tmp_path: Path, data_cache: Path) -> None:
    # As a user runs it: the `moesaic` command in the folder that holds the file, no PYTHONPATH.
    (tmp_path / "myrouter_file.py").write_text(ONE_FILE_ROUTER)
    cfg = _write(tmp_path / "cfg.yaml", {"kind": "myrouter_file:MyRouter", "temperature": 0.5})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(Path(sys.executable).parent / "moesaic"), "train", str(cfg), "--out",
                          str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 3
    assert all(isinstance(r["loss"], float) and r["loss"] == r["loss"] for r in train_rows)
    assert all(r["aux_loss"] >= 0.01 * 2 for r in train_rows)  # E * sum P^2 >= 1 per layer, coefficient 0.01


def test_dotted_path_in_process_registers_under_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        request: pytest.FixtureRequest) -> None:
    (tmp_path / "myrouter_inproc.py").write_text(ONE_FILE_ROUTER)
    monkeypatch.syspath_prepend(str(tmp_path))
    kind = "myrouter_inproc:MyRouter"
    request.addfinalizer(lambda: (sys.modules.pop("myrouter_inproc", None), ROUTERS.remove(kind)))
    cfg = load_run_config(data=copy.deepcopy(TOY), overrides=[f"model.moe.router.kind={kind}"])
    router_cfg = cfg.model.moe.router
    assert type(router_cfg).__name__ == "MyRouterConfig" and router_cfg.kind == kind
    assert type(router_cfg)().kind == kind  # the Config's default kind is the name it was registered under
    assert kind in ROUTERS.names() and ROUTERS.describe(kind).startswith("Top-k of a tempered softmax")
    again = load_run_config(data=to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("kind,rule", [
    ("no_such_module_xyz:Router", "cannot import module 'no_such_module_xyz' (ModuleNotFoundError"),
    ("moesaic.moe.routing.topk:NoSuchRouter", "module 'moesaic.moe.routing.topk' has no attribute 'NoSuchRouter'"),
    ("moesaic.moe.experts.stacked_ffn:GLUExperts",
     "is not a router: must subclass moesaic.moe.routing.base.Router"),
    ("moesaic.moe.routing.topk:", "must look like module.path:ClassName"),
])
def test_broken_dotted_path_is_a_config_error_naming_the_field(kind: str, rule: str) -> None:
    data = copy.deepcopy(TOY)
    data["model"]["moe"]["router"] = {"kind": kind}
    with pytest.raises(ConfigError) as e:
        load_run_config(data=data)
    assert e.value.path == "model.moe.router.kind" and e.value.value == kind
    assert rule in e.value.rule


def test_module_that_fails_on_import_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_router_mod.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"cannot import module 'broken_router_mod' \(RuntimeError: boom\)"):
        load_run_config(data=copy.deepcopy(TOY),
                        overrides=["model.moe.router.kind=broken_router_mod:Router"])


def test_unknown_name_keeps_its_message() -> None:
    with pytest.raises(ConfigError) as e:
        load_run_config(data=copy.deepcopy(TOY), overrides=["model.moe.router.kind=topkk"])
    assert e.value.rule.startswith("unknown router kind; known: ") and "did you mean 'topk'?" in e.value.rule
