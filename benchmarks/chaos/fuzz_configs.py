"""Config fuzzing for benchmarks/chaos/run.py: generated configs through the checker (in process), a sample
through `moesaic check`, and every accepted one through 2 training steps under RLIMIT_AS and a 60 s timeout."""

from __future__ import annotations

import copy
import json
import math
import random
import resource
import signal
import subprocess
import sys
from typing import Any

import yaml

EXPECTED = ("ConfigError",)  # the checker's one typed error (unknown kinds are ConfigErrors too)
MEMORY_LIMIT = 8 * 2**30  # RLIMIT_AS of each training process (torch alone maps ~2-3 GiB of address space)
WEIRD = ["", "💥", "ünïcödé", "a" * 10000, "../../etc/passwd", "${HOME}", "null", "1e309", "\x00", "kind"]


def _paths(d: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(d, dict):
        out = [prefix] if prefix else []
        for k, v in d.items():
            out += _paths(v, (*prefix, k))
        return out
    return [prefix]


def _get(d: dict, path: tuple) -> Any:
    for k in path[:-1]:
        d = d[k]
    return d


def _random_value(rng: random.Random, old: Any) -> Any:
    choices = [
        lambda: rng.randint(-5, 5), lambda: 10 ** rng.randint(10, 400), lambda: -(10 ** rng.randint(3, 30)),
        lambda: rng.choice([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324]), lambda: rng.choice(WEIRD),
        lambda: [rng.randint(0, 3)] * rng.randint(0, 3), lambda: {rng.choice(WEIRD): 1}, lambda: None,
        lambda: rng.choice([True, False]), lambda: rng.uniform(-10, 10)]
    if isinstance(old, bool):
        choices += [lambda: not old] * 3
    elif isinstance(old, int):  # plausible values too, so that some configs pass and train
        choices += [lambda: rng.choice([1, 2, 3, 4, 8, 16, 32, 64])] * 6 + [lambda: rng.choice([2**20, 2**31])]
    elif isinstance(old, float):
        choices += [lambda: rng.choice([0.0, 1e-4, 0.01, 0.5, 0.999, 1.0, 2.0])] * 6
    return rng.choice(choices)()


def _deep(rng: random.Random) -> Any:
    v: Any = rng.randint(0, 9)
    for _ in range(rng.randint(50, 400)):
        v = {"x": v}
    return v


def generate(base: dict, full: dict, rng: random.Random) -> dict:
    """One config: the working base, then 1-4 mutations over every field of the schema (``full``)."""
    cfg = copy.deepcopy(base)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        path = rng.choice(_paths(full))
        if op < 0.55:  # a random value for a field (set even when the base omits it)
            d = cfg
            for k in path[:-1]:
                if not isinstance(d.get(k), dict):
                    d[k] = {}
                d = d[k]
            d[path[-1]] = _random_value(rng, _get(full, path)[path[-1]])
        elif op < 0.7:  # delete a key
            p = rng.choice(_paths(cfg))
            try:
                del _get(cfg, p)[p[-1]]
            except (KeyError, TypeError):
                pass
        elif op < 0.85:  # add a key
            p = rng.choice(_paths(cfg) or [("x",)])
            parent = _get(cfg, p)
            if isinstance(parent, dict):
                parent[rng.choice(WEIRD) + str(rng.randint(0, 99))] = _random_value(rng, 0)
        elif op < 0.93:  # deep nesting
            p = rng.choice(_paths(cfg))
            _get(cfg, p)[p[-1]] = _deep(rng)
        else:  # a whole section replaced
            cfg[rng.choice(["model", "data", "train", "parallel", "ünï"])] = _random_value(rng, {})
    return cfg


def check_in_process(cfg: dict) -> tuple[str, str]:
    """("accepted" | error type, message). A timeout is reported as "HANG"."""
    from moesaic.core.errors import MoesaicError
    from moesaic.train.run_config import load_run_config

    def alarm(*_: Any) -> None:
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(10)
    try:
        load_run_config(data=copy.deepcopy(cfg))
        return "accepted", ""
    except MoesaicError as e:
        return type(e).__name__, str(e)
    except TimeoutError:
        return "HANG", ""
    except BaseException as e:  # noqa: BLE001 - an untyped error is exactly what the fuzzing looks for
        return f"UNTYPED {type(e).__name__}", str(e)[:200]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def cpu_note(r: dict) -> str:
    return f"wall {r['wall']:.0f} s, CPU {r['cpu'] if r['cpu'] is None else round(r['cpu'], 1)} s"


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_config_fuzz(run: Any, base: dict, n: int, n_cli: int, rng: random.Random) -> tuple[list[dict], str]:
    from moesaic.core.config import to_dict
    from moesaic.train.run_config import load_run_config

    full = to_dict(load_run_config(data=copy.deepcopy(base)))
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    outcomes: dict[str, int] = {}
    accepted: list[dict] = []
    untyped: list[str] = []
    cases: list[tuple[dict, str]] = []
    for _ in range(n):
        cfg = generate(base, full, rng)
        kind, msg = check_in_process(cfg)
        outcomes[kind] = outcomes.get(kind, 0) + 1
        cases.append((cfg, kind))
        if kind == "accepted":
            accepted.append(cfg)
        elif kind not in EXPECTED:
            untyped.append(f"{kind}: {msg}")
    rows = [{"case": f"{n} generated configs through the checker (in process)",
             "expect": f"accepted or {' / '.join(EXPECTED)}; nothing else, no hang",
             "got": ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
             "ok": not untyped, "traceback": bool(untyped), "hang": "HANG" in outcomes, "lost": False}]
    # a sample through the CLI
    d = run.work / "fuzz"
    d.mkdir()
    cli_bad = []
    sample = rng.sample(cases, min(n_cli, len(cases)))
    for i, (cfg, kind) in enumerate(sample):
        p = d / f"c{i}.yaml"
        try:
            p.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        except (RecursionError, yaml.YAMLError):
            p.write_text(json.dumps(cfg))  # JSON is YAML too
        try:
            r = subprocess.run([sys.executable, "-m", "moesaic", "check", str(p)], capture_output=True, text=True,
                               env=run.env, timeout=60)
        except subprocess.TimeoutExpired:
            cli_bad.append(f"c{i}: hang")
            continue
        lines = r.stderr.strip().splitlines()
        want = 0 if kind == "accepted" else 2
        if r.returncode != want or "Traceback" in r.stderr or (want == 2 and (len(lines) != 1
                                                                              or not lines[0].startswith("error: "))):
            cli_bad.append(f"c{i}: rc {r.returncode}, {r.stderr.strip()[-200:]}")
    rows.append({"case": f"{len(sample)} of them through `moesaic check`",
                 "expect": "exit 0 when accepted in process, else exit 2 with one `error:` line",
                 "got": f"{len(sample) - len(cli_bad)} as expected" + (f"; {cli_bad[:3]}" if cli_bad else ""),
                 "ok": not cli_bad, "traceback": any("Traceback" in b for b in cli_bad),
                 "hang": any("hang" in b for b in cli_bad), "lost": False})
    # the accepted ones: 2 training steps each
    trained: dict[str, int] = {}
    bad = []
    walls: list[float] = []
    for i, cfg in enumerate(accepted):
        cfg = copy.deepcopy(cfg)
        p = d / f"a{i}.yaml"
        p.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        out = d / f"run{i}"
        r = run.train(p, out, "--set", "train.max_steps=2", "--set", "train.progress=false", timeout=60,
                      preexec=_limit)
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] \
            if (out / "metrics.jsonl").exists() else []
        walls.append(r["wall"])
        if r["hang"]:
            key = "HANG"
            stack = [ln.strip() for ln in r["stderr"].splitlines() if ln.strip().startswith("File ")]
            bad.append(f"a{i} hang, {cpu_note(r)}; innermost frames: {stack[:3]}")
        elif r["rc"] == 0 and recs and all(math.isfinite(x["loss"]) for x in recs) and recs[-1]["step"] == 2:
            key = "trained, finite loss"
        elif r["rc"] == 2 and r["type"] not in (None, "ok") and not recs:
            size = "GiB for weights, gradients and AdamW state" in r["stderr"]
            key = f"{r['type']} {'(size check) ' if size else ''}before the first step"
        else:
            key = f"FAILED rc {r['rc']} {r['type']}"
            bad.append(f"a{i}: {r['stderr'].strip()[-300:]}")
        if "Traceback" in r["stderr"]:
            bad.append(f"a{i}: traceback")
        trained[key] = trained.get(key, 0) + 1
    rows.append({"case": f"{len(accepted)} accepted configs, 2 training steps each (RLIMIT_AS 8 GiB, 60 s)",
                 "expect": "finite loss, or a typed error before the first step",
                 "got": ", ".join(f"{k} {v}" for k, v in sorted(trained.items()))
                        + (f"; slowest {max(walls):.1f} s, median {sorted(walls)[len(walls) // 2]:.1f} s"
                           if walls else "")
                        + (f"; {bad[:2]}" if bad else ""),
                 "ok": not bad and "HANG" not in trained, "traceback": any("traceback" in b for b in bad),
                 "hang": "HANG" in trained, "lost": False})
    # a model far too large for memory: refused by the size check before allocation, quickly
    huge = copy.deepcopy(base)
    huge["model"]["moe"].update(num_experts=4096, d_ff=1 << 16)
    p = d / "huge.yaml"
    p.write_text(yaml.safe_dump(huge))
    r = run.train(p, d / "huge", timeout=60, preexec=_limit)
    last = r["stderr"].strip().splitlines()[-1] if r["stderr"].strip() else ""
    ok = (r["rc"] == 2 and r["type"] == "ConfigError" and "GiB for weights, gradients" in last
          and not (d / "huge").exists() and "Traceback" not in r["stderr"])
    rows.append({"case": "a model too large for memory (4096 experts of d_ff 65536 per layer)",
                 "expect": "exit 2, ConfigError from the size check before allocation (60 s timeout), no --out left",
                 "got": f"rc {r['rc']}, {r['type']}: '{last[:110]}', {r['wall']:.1f} s", "ok": ok,
                 "traceback": "Traceback" in r["stderr"], "hang": r["hang"], "lost": False})
    summary = (f"Generated from the working base config by 1-4 mutations each over every field of the schema "
               f"(random values of every type, out-of-range numbers, 10^10..10^400, NaN/inf, unicode and 10 000-char "
               f"strings, key deletions and additions, 50-400-level nesting, whole sections replaced). Untyped "
               f"errors: {len(untyped)}" + (f" (first: {untyped[:3]})" if untyped else "") + ".")
    return rows, summary
