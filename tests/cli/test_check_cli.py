"""``moesaic check`` rejects bad configs with exit 2 and exactly one ``error: ...`` line naming the field,
before anything is built, and accepts good ones with exit 0.

Every case runs the real command ``python -m moesaic check FILE``. Importing torch costs seconds per
interpreter on 2 cores, so one helper interpreter imports moesaic once and then forks one child per case;
each child runs the ``moesaic`` module as ``__main__`` (exactly what ``python -m moesaic`` does) with its own
argv, stdout and stderr. A few cases also run as fully separate ``python -m moesaic`` processes, and must
give byte-identical results, which validates the helper.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}

HARNESS = r"""
import json, os, runpy, sys, tempfile, traceback
import moesaic.cli, moesaic.train.run_config  # noqa: F401  (the expensive imports, once)
from moesaic.train.datasets.base import DATASETS
from moesaic.moe.dispatch.base import DISPATCHERS
from moesaic.moe.experts.base import EXPERTS
from moesaic.models.base import MODELS
from moesaic.moe.routing.base import ROUTERS
for reg in (ROUTERS, DISPATCHERS, EXPERTS, MODELS, DATASETS):
    reg.names()
results = []
for argv in json.loads(sys.stdin.read()):
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        sys.argv = ["moesaic", *argv]
        code = 0
        try:
            runpy.run_module("moesaic", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0); err.seek(0)
    results.append([os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()])
print(json.dumps(results))
"""


def run_forked(argvs: list[list[str]]) -> list[tuple[int, str, str]]:
    p = subprocess.run([sys.executable, "-c", HARNESS], input=json.dumps(argvs), capture_output=True, text=True,
                       env=ENV, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr
    return [tuple(r) for r in json.loads(p.stdout.strip().splitlines()[-1])]


GOOD = {
    "model": {"kind": "moe_regression", "d_in": 8, "d_model": 16,
              "moe": {"d_ff": 32, "num_experts": 4, "top_k": 2,
                      "router": {"kind": "topk", "aux_loss_coef": 0.01},
                      "dispatcher": {"kind": "sort"}, "experts": {"kind": "glu", "activation": "silu"}}},
    "data": {"kind": "toy_regression", "d_in": 8},
    "train": {"max_steps": 10, "lr": 1e-3},
}


def edit(path: str, value):
    """A copy of GOOD with ``path`` (dotted) set to ``value`` (``DELETE`` removes it)."""
    data = copy.deepcopy(GOOD)
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return yaml.safe_dump(data, sort_keys=False)


MOE = "model.moe"
# (case id, YAML text, extra argv, a substring the error line must contain: the field)
BAD = [
    ("top_k_gt_E", edit(f"{MOE}.top_k", 9), [], "model.moe.top_k"),
    ("top_k_zero", edit(f"{MOE}.top_k", 0), [], "model.moe.top_k"),
    ("top_k_negative", edit(f"{MOE}.top_k", -1), [], "model.moe.top_k"),
    ("num_experts_zero", edit(f"{MOE}.num_experts", 0), [], "model.moe.num_experts"),
    ("cf_zero", edit(f"{MOE}.dispatcher", {"kind": "capacity", "capacity_factor": 0}), [],
     "model.moe.dispatcher.capacity_factor"),
    ("cf_negative", edit(f"{MOE}.dispatcher", {"kind": "capacity", "capacity_factor": -1.0}), [],
     "model.moe.dispatcher.capacity_factor"),
    ("cf_nan", edit(f"{MOE}.dispatcher", {"kind": "capacity", "capacity_factor": float("nan")}), [],
     "model.moe.dispatcher.capacity_factor"),
    ("cf_inf", edit(f"{MOE}.dispatcher", {"kind": "capacity", "capacity_factor": float("inf")}), [],
     "model.moe.dispatcher.capacity_factor"),
    ("cf_string", edit(f"{MOE}.dispatcher", {"kind": "capacity", "capacity_factor": "big"}), [],
     "model.moe.dispatcher.capacity_factor"),
    ("eval_cf_zero", edit(f"{MOE}.dispatcher", {"kind": "capacity", "eval_capacity_factor": 0.0}), [],
     "model.moe.dispatcher.eval_capacity_factor"),
    ("drop_policy", edit(f"{MOE}.dispatcher", {"kind": "capacity", "drop_policy": "random"}), [],
     "model.moe.dispatcher.drop_policy"),
    ("groups_not_dividing", edit(f"{MOE}.router", {"kind": "topk", "n_groups": 3}), [], "model.moe.router.n_groups"),
    ("topk_groups_gt_groups", edit(f"{MOE}.router", {"kind": "topk", "n_groups": 2, "topk_groups": 3}), [],
     "model.moe.router.topk_groups"),
    ("groups_too_few_for_k", edit(f"{MOE}.router", {"kind": "topk", "n_groups": 4, "topk_groups": 1}), [],
     "model.moe.router.topk_groups"),
    ("device_groups", edit(f"{MOE}.router", {"kind": "topk", "device_groups": 3}), [],
     "model.moe.router.device_groups"),
    ("sigmoid_softmax_topk", edit(f"{MOE}.router", {"kind": "topk", "score_func": "sigmoid",
                                                    "normalization": "softmax_topk"}), [],
     "model.moe.router.normalization"),
    ("score_func", edit(f"{MOE}.router", {"kind": "topk", "score_func": "relu"}), [], "model.moe.router.score_func"),
    ("unknown_router", edit(f"{MOE}.router", {"kind": "topkk"}), [], "model.moe.router.kind"),
    ("unknown_dispatcher", edit(f"{MOE}.dispatcher", {"kind": "sorted_magic"}), [], "model.moe.dispatcher.kind"),
    ("unknown_experts", edit(f"{MOE}.experts", {"kind": "glue"}), [], "model.moe.experts.kind"),
    ("unknown_model", edit("model.kind", "moe_regresion"), [], "model.kind"),
    ("unknown_dataset", edit("data.kind", "toy"), [], "data.kind"),
    ("typo_moe_key", edit(f"{MOE}.num_expert", 4), [], "did you mean 'num_experts'"),
    ("typo_router_key", edit(f"{MOE}.router", {"kind": "topk", "aux_los_coef": 0.1}), [],
     "did you mean 'aux_loss_coef'"),
    ("typo_section", edit("trian", {"lr": 0.1}), [], "did you mean 'train'"),
    ("string_for_int", edit(f"{MOE}.num_experts", "four"), [], "model.moe.num_experts"),
    ("bool_for_int", edit(f"{MOE}.top_k", True), [], "model.moe.top_k"),
    ("float_for_int", edit(f"{MOE}.num_experts", 4.0), [], "model.moe.num_experts"),
    ("null_for_int", edit(f"{MOE}.d_ff", None), [], "model.moe.d_ff"),
    ("list_for_mapping", edit(f"{MOE}.router", ["topk"]), [], "model.moe.router"),
    ("string_for_bool", edit(f"{MOE}.mask_padding", "yes please"), [], "model.moe.mask_padding"),
    ("negative_aux", edit(f"{MOE}.router", {"kind": "topk", "aux_loss_coef": -0.01}), [],
     "model.moe.router.aux_loss_coef"),
    ("negative_z", edit(f"{MOE}.router", {"kind": "topk", "z_loss_coef": -1e-3}), [], "model.moe.router.z_loss_coef"),
    ("nan_aux", edit(f"{MOE}.router", {"kind": "topk", "aux_loss_coef": float("nan")}), [],
     "model.moe.router.aux_loss_coef"),
    ("granularity", edit(f"{MOE}.granularity", 3), [], "model.moe.granularity"),
    ("switch_top2", edit(f"{MOE}.router", {"kind": "switch"}), [], "model.moe.top_k"),
    ("gshard_theta", edit(f"{MOE}.router", {"kind": "gshard", "theta": 0.0}), [], "model.moe.router.theta"),
    ("noisy_eps", edit(f"{MOE}.router", {"kind": "noisy_topk", "noise_eps": -1.0}), [],
     "model.moe.router.noise_eps"),
    ("ec_cf", edit(f"{MOE}.router", {"kind": "expert_choice", "capacity_factor": 0}), [],
     "model.moe.router.capacity_factor"),
    ("activation", edit(f"{MOE}.experts", {"kind": "glu", "activation": "swish"}), [],
     "model.moe.experts.activation"),
    ("backend", edit(f"{MOE}.experts", {"kind": "glu", "backend": "warp_drive"}), [], "model.moe.experts.backend"),
    ("lr_negative", edit("train.lr", -0.1), [], "train.lr"),
    ("steps_zero", edit("train.max_steps", 0), [], "train.max_steps"),
    ("d_model_zero", edit("model.d_model", 0), [], "model.d_model"),
    ("duplicate_key", "model:\n  kind: moe_regression\n  d_model: 16\n  d_model: 32\n", [], "d_model"),
    ("python_object_tag", "model: !!python/object/apply:os.system ['echo pwned']\n", [], "tag"),
    ("python_name_tag", "model:\n  kind: !!python/name:os.system\n", [], "tag"),
    ("invalid_yaml", "model:\n  kind: [moe_regression\n", [], "invalid YAML"),
    ("bad_indent", "model:\n  kind: moe_regression\n   d_model: 3\n", [], "invalid YAML"),
    ("top_level_list", "- model\n- data\n", [], "mapping"),
    ("set_without_equals", yaml.safe_dump(GOOD), ["--set", "model.moe.top_k"], "--set"),
    ("set_empty_part", yaml.safe_dump(GOOD), ["--set", "model..top_k=2"], "--set"),
    ("set_typo", yaml.safe_dump(GOOD), ["--set", "model.moe.topk=2"], "did you mean 'top_k'"),
    ("set_bad_value", yaml.safe_dump(GOOD), ["--set", "model.moe.top_k=9"], "model.moe.top_k"),
    ("set_inside_scalar", yaml.safe_dump(GOOD), ["--set", "model.d_model.x=1"], "model.d_model"),
    ("missing_file", None, [], "not found"),
    ("binary_file", b"\xff\xfe\x00model", [], "UTF-8"),
]


BAD_COMMAND_LINES = [["check"], ["frobnicate"], ["check", "a.yaml", "--sett", "x=1"]]


def _argvs(tmp_path):
    argvs = []
    for cid, text, extra, _ in BAD:
        path = tmp_path / f"{cid}.yaml"
        if isinstance(text, bytes):
            path.write_bytes(text)
        elif text is not None:
            path.write_text(text)
        argvs.append(["check", str(path), *extra])
    return argvs


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case of this file in one helper interpreter: BAD, then the good ones, bad command lines, list."""
    tmp_path = tmp_path_factory.mktemp("cli")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    argvs = _argvs(tmp_path) + [["check", str(good)], ["check", str(REPO / "configs/toy_layer.yaml")],
                                ["check", str(good), "--set", "model.moe.top_k=1", "--set",
                                 "model.moe.router={kind: switch}"]] + BAD_COMMAND_LINES + [["list"]]
    res = run_forked(argvs)
    nb, ng, nc = len(BAD), 3, len(BAD_COMMAND_LINES)
    return {"argvs": argvs, "bad": res[:nb], "good": res[nb:nb + ng], "cmd": res[nb + ng:nb + ng + nc],
            "list": res[-1]}


def test_at_least_30_distinct_bad_configs_are_rejected_with_one_line(results):
    assert len({cid for cid, *_ in BAD}) == len(BAD) >= 30
    for (cid, _, _, field), (rc, out, err) in zip(BAD, results["bad"]):
        lines = err.splitlines()
        assert rc == 2, (cid, rc, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (cid, err)
        assert "Traceback" not in err and out == "", cid
        assert field in lines[0], (cid, field, lines[0])


def test_good_configs_pass(results):
    for rc, out, err in results["good"]:
        assert rc == 0 and out.startswith("ok: ") and err == "", (out, err)


def test_forked_runs_equal_real_processes(results):
    """The helper is faithful: separate ``python -m moesaic`` processes give byte-identical results."""
    picks = [i for i, (cid, *_) in enumerate(BAD) if cid in {"typo_moe_key", "python_object_tag"}]
    picks.append(len(BAD))  # the good config
    procs = [subprocess.Popen([sys.executable, "-m", "moesaic", *results["argvs"][i]], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO) for i in picks]
    forked = results["bad"] + results["good"]
    for p, i in zip(procs, picks):
        out, err = p.communicate(timeout=300)
        assert (p.returncode, out, err) == tuple(forked[i])


def test_bad_command_lines_are_one_line_errors(results):
    for argv, (rc, _out, err) in zip(BAD_COMMAND_LINES, results["cmd"]):
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (argv, err)


def test_list_shows_every_router_with_a_description(results):
    rc, out, err = results["list"]
    assert rc == 0 and err == ""
    from moesaic.moe.routing.base import ROUTERS

    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    for name in ROUTERS.names():
        assert name in lines and len(lines[name].split()) > 1, name
