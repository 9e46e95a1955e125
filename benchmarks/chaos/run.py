"""`make chaos`: kill -9 at random moments, disk full and read-only output during a save, non-finite training,
fuzzed configs; writes chaos-report.md (docs/reliability.md holds the latest full report).

    python benchmarks/chaos/run.py [--short] [--report chaos-report.md] [--seed 0]

Every case names the exit code and the exception type it expects (recorded in the process by launch.py) and
counts a case as passed only when it gets exactly that; stderr is searched for "Traceback"; every subprocess
has a timeout (a timeout is a hang).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent / "src"))  # this checkout's moesaic, as in every subprocess
from bad_data import bad_data  # noqa: E402
from ep import ep_kills  # noqa: E402
from fuzz_configs import run_config_fuzz  # noqa: E402
from serve_fuzz import serve_fuzz  # noqa: E402

BASE = {
    "model": {"kind": "decoder_lm", "d_model": 16, "num_layers": 2, "d_ff": 32, "max_seq_len": 32,
              "attention": {"num_heads": 2},
              "moe": {"d_ff": 32, "num_experts": 4, "top_k": 2, "router": {"kind": "topk", "aux_loss_coef": 0.01}}},
    "data": {"kind": "shakespeare", "tokenizer": "char", "seq_len": 16, "train_plays": ["macbeth"],
             "val_plays": ["tempest"], "eval_windows": 4},
    "train": {"max_steps": 12, "batch_size": 4, "grad_accum": 2, "lr": 0.003, "warmup_steps": 3, "log_every": 1,
              "eval_every": 3, "save_every": 4, "keep_last": 10, "tensorboard": False, "progress": False,
              "threads": 1},
}
COMPARED = ("model.safetensors", "trainer_state.json", "rng.pt")


class Run:
    def __init__(self, work: Path):
        self.work = work
        self.n = 0
        self.env = dict(os.environ, MOESAIC_CACHE=str(work / "cache"), OMP_NUM_THREADS="1",
                        PYTHONPATH=os.pathsep.join([str(HERE.parent.parent / "src"), os.environ.get("PYTHONPATH", "")]))

    def train(self, cfg: Path, out: Path, *args: str, fault: tuple[str, ...] = (), timeout: float = 180,
              kill_after: float | None = None, preexec: Any = None) -> dict:
        self.n += 1  # outside --out's file system: a full disk must not stop the launcher's own record
        res = self.work / "results" / f"{self.n}-{out.name}.result"
        res.parent.mkdir(exist_ok=True)
        cmd = [sys.executable, str(HERE / "launch.py"), "--result", str(res), *fault, "--", "train", str(cfg),
               "--out", str(out), *args]
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
                             preexec_fn=preexec)
        hang, cpu = False, None
        try:
            so, se = p.communicate(timeout=kill_after if kill_after is not None else timeout)
        except subprocess.TimeoutExpired:
            if kill_after is None:  # a hang: the launcher's faulthandler prints every thread's stack first
                hang = True
                cpu = cpu_seconds(p.pid)
                p.send_signal(signal.SIGUSR1)
                time.sleep(2)
            p.kill()
            so, se = p.communicate()
        return {"rc": p.returncode, "stderr": se, "stdout": so, "hang": hang, "wall": time.perf_counter() - t0,
                "cpu": cpu, "type": res.read_text() if res.exists() else None}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (tells a starved run from a spinning one)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def write_cfg(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def same_as(ref: Path, out: Path, step: int) -> bool:
    import torch
    a, b = ref / f"step-{step:08d}", out / f"step-{step:08d}"
    if not b.is_dir():
        return False
    if any((a / n).read_bytes() != (b / n).read_bytes() for n in COMPARED):
        return False
    oa, ob = (torch.load(d / "optimizer.pt", weights_only=True) for d in (a, b))
    ta = [t for s in oa["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    tb = [t for s in ob["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    return len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))


def last_line(r: dict) -> str:
    lines = r["stderr"].strip().splitlines()
    return lines[-1][:120] if lines else ""


def tb(r: dict) -> bool:
    return "Traceback" in r["stderr"]


def kills(run: Run, cfg: Path, ref: Path, n: int, rng: random.Random, ref_wall: float) -> list[dict]:
    steps = BASE["train"]["max_steps"]
    saves = [s for s in range(1, steps + 1) if s % BASE["train"]["save_every"] == 0 and s < steps]
    evals = [s for s in range(1, steps) if s % BASE["train"]["eval_every"] == 0]
    kinds = ["forward", "backward", "optimizer", "eval", "point:checkpoint.after_files",
             "point:checkpoint.before_publish", "point:checkpoint.after_publish", "time"]
    rows = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        out = run.work / f"kill-{i}"
        if kind == "time":
            at = rng.uniform(0.3, 0.95) * ref_wall
            r = run.train(cfg, out, kill_after=at)
            where = f"SIGKILL after {at:.1f} s"
        else:
            if kind == "eval":
                s = rng.choice(evals) - 1
            elif kind.startswith("point:"):
                s = rng.choice(saves)
            else:
                s = rng.randrange(steps)
            nth = rng.randint(1, 12)
            fault = ("--kill", kind, "--step", str(s)) + (("--nth", str(nth)) if kind in ("forward", "backward",
                                                                                            "eval") else ())
            r = run.train(cfg, out, fault=fault)
            where = f"{kind} at step {s}" + (f", module call {nth}" if "--nth" in fault else "")
        killed = r["rc"] == -9
        before = sorted(p.name for p in out.glob("step-*"))
        r2 = run.train(cfg, out, "--resume")
        ok = killed and r2["rc"] == 0 and not tb(r2) and not r2["hang"] and same_as(ref, out, steps)
        lost = not same_as(ref, out, steps)
        rows.append({"case": f"kill -9 #{i + 1}: {where}", "expect": "SIGKILL, then --resume exit 0, bitwise equal",
                     "got": f"rc {r['rc']}{'' if killed else ' ' + str(r['type']) + ': ' + last_line(r)}, "
                            f"checkpoints {len(before)}; resume rc {r2['rc']}, "
                            f"{'bitwise equal' if not lost else 'DIFFERENT'}",
                     "ok": ok, "traceback": tb(r2), "hang": r["hang"] or r2["hang"], "lost": lost})
    return rows


def one_line_error(r: dict, folder: Path) -> bool:
    lines = r["stderr"].strip().splitlines()
    return bool(lines) and lines[-1].startswith("error: ") and str(folder) in lines[-1]


def disk(run: Run, cfg: Path, ref: Path) -> list[dict]:
    import moesaic
    from moesaic.train import checkpoint as ckpt

    rows = []
    mnt = run.work / "tmpfs"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        return [{"case": "disk full (tmpfs)", "expect": "mount permitted", "got": mounted.stderr.strip(),
                 "ok": False, "traceback": False, "hang": False, "lost": False}]
    quiet = ("--set", "train.log_every=100", "--set", "train.eval_every=100")
    try:
        ro = ("--readonly", str(mnt / "ro"), "--step", "5")
        for name, fault in (("disk full (4 MiB tmpfs filled at step 6)", ("--fill", str(mnt), "--step", "5")),
                            ("read-only bind mount of --out at step 6", ro)):
            out = mnt / ("full" if "full" in name else "ro")
            r = run.train(cfg, out, *quiet, fault=fault)
            prev = ckpt.latest_valid(out, warn=lambda _m: None)
            loadable = prev is not None and prev.name == "step-00000004" and moesaic.load(prev) is not None
            ok = (r["rc"] == 2 and r["type"] == "OutputWriteError" and one_line_error(r, out) and loadable
                  and not tb(r))
            if "read-only" in name:
                subprocess.run(["umount", str(out)], check=False)
            else:
                (mnt / ".chaos-filler").unlink()
            r2 = run.train(cfg, out, *quiet, "--resume")  # space back / writable again: the run goes on
            cont = r2["rc"] == 0 and same_as(ref, out, 12)
            rows.append({"case": name, "expect": "exit 2, OutputWriteError, one line naming the folder; step 4 "
                         "loadable; --resume afterwards bitwise equal",
                         "got": f"rc {r['rc']}, {r['type']}, '{r['stderr'].strip().splitlines()[-1][:90]}...'; "
                                f"previous {prev.name if prev else None} loadable={loadable}; resume rc {r2['rc']}, "
                                f"{'bitwise equal' if cont else 'DIFFERENT'}",
                         "ok": ok and cont, "traceback": tb(r) or tb(r2), "hang": r["hang"] or r2["hang"],
                         "lost": not loadable or not cont})
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    return rows


def nonfinite(run: Run, cfg: Path, ref: Path) -> list[dict]:
    from moesaic.train import checkpoint as ckpt

    rows = []
    for inject in ("nan-act", "inf-grad", "nan-weight"):
        for policy in ("stop", "skip_step", "rollback"):
            out = run.work / f"nf-{inject}-{policy}"
            r = run.train(cfg, out, "--set", f"train.on_nonfinite={policy}",
                          fault=("--inject", inject, "--step", "5", "--nth", "3"))
            fails = policy == "stop" or (policy == "skip_step" and inject == "nan-weight")
            named = "step 6: non-finite " in r["stderr"]
            if fails:
                want = "exit 2, NonFiniteTrainingError naming step 6 and the layer; step 4 intact"
                prev = ckpt.latest_valid(out, warn=lambda _m: None)
                ok = (r["rc"] == 2 and r["type"] == "NonFiniteTrainingError" and named and prev is not None
                      and prev.name == "step-00000004" and same_as(ref, out, 4))
            elif policy == "skip_step":
                want = "exit 0, step 6 skipped with a warning naming it, finite final loss"
                last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1]) if out.exists() else {}
                ok = r["rc"] == 0 and named and math.isfinite(last.get("loss", math.nan))
            else:
                want = "exit 0, rolled back to step 4, final checkpoint bitwise equal to the unbroken run"
                ok = r["rc"] == 0 and "rolling back to" in r["stderr"] and same_as(ref, out, 12)
            msg = next((ln for ln in r["stderr"].splitlines() if "non-finite" in ln), "")
            rows.append({"case": f"{inject}, on_nonfinite={policy}", "expect": want,
                         "got": f"rc {r['rc']}, {r['type']}: {msg.strip()[:110]}", "ok": ok, "traceback": tb(r),
                         "hang": r["hang"], "lost": fails and not ok})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| case | expected | got | pass |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {r['expect']} | {r['got'].replace('|', '/')} | {'yes' if r['ok'] else '**NO**'} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true", help="the CI version: fewer kills and configs")
    ap.add_argument("--report", default="chaos-report.md")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sections", default="kill,disk,nonfinite,data,ep,serve,configs",
                    help="comma-separated subset (to run parts side by side; the report lists what ran)")
    a = ap.parse_args()
    only = set(a.sections.split(","))
    rng = random.Random(a.seed)
    n_kill, n_cfg, n_cli = (8, 150, 10) if a.short else (20, 1000, 50)
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="moesaic-chaos-") as tmp:
        run = Run(Path(tmp))
        os.environ["MOESAIC_CACHE"] = run.env["MOESAIC_CACHE"]
        cfg = write_cfg(run.work / "chaos.yaml", BASE)
        ref = run.work / "reference"
        r = run.train(cfg, ref)
        assert r["rc"] == 0, r["stderr"]
        sections: dict[str, list[dict]] = {}
        if "kill" in only:
            print("kill -9 ...", flush=True)
            sections["Kill -9 at random moments, then --resume"] = kills(run, cfg, ref, n_kill, rng, r["wall"])
        if "disk" in only:
            print("disk ...", flush=True)
            sections["Disk full and read-only output during a save"] = disk(run, cfg, ref)
        if "nonfinite" in only:
            print("non-finite ...", flush=True)
            sections["Non-finite training (injected at step 6; checkpoints every 4 steps)"] = nonfinite(run, cfg, ref)
        if "data" in only:
            print("bad data ...", flush=True)
            sections["Bad data (a user's text file, `data.kind: text`; tokenizer files)"] = bad_data(
                run, BASE, write_cfg, tb)
        if "ep" in only:
            print("expert parallelism ...", flush=True)
            sections["Expert parallelism: one rank of 4 killed (gloo)"] = ep_kills(run, BASE, write_cfg, same_as, tb,
                                                                                  a.short)
        notes: list[str] = []
        if "serve" in only:
            if importlib.util.find_spec("moesaic.cli.serve") is None:
                notes.append("`moesaic serve` fuzzing did not run: `moesaic serve` is not in this checkout.")
            else:
                print("serve ...", flush=True)
                n_req, n_disc = (250, 50) if a.short else (1000, 200)
                sections["`moesaic serve`: fuzzed requests and abrupt disconnects"] = serve_fuzz(
                    run, ref / "step-00000012", n_req, n_disc, a.seed)
        cfg_summary = ""
        if "configs" in only:
            print("configs ...", flush=True)
            sections["Fuzzed configs"], cfg_summary = run_config_fuzz(run, BASE, n_cfg, n_cli, rng)
    rows = [x for v in sections.values() for x in v]
    load = os.getloadavg()
    lines = [f"# Chaos report ({'short' if a.short else 'full'} run, seed {a.seed}, sections {a.sections})", "",
             f"Generated by `python benchmarks/chaos/run.py{' --short' if a.short else ''} --sections {a.sections}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {time.time() - t_start:.0f} s "
             f"(load average at the end {load[0]:.1f}, machine shared with other jobs).", "",
             "## Totals", "",
             f"- cases: {len(rows)}, passed: {sum(r['ok'] for r in rows)}, failed: {sum(not r['ok'] for r in rows)}",
             f"- losses of data: {sum(r['lost'] for r in rows)}",
             f"- tracebacks reaching the user: {sum(r['traceback'] for r in rows)}",
             f"- hangs (timeouts): {sum(r['hang'] for r in rows)}", "", *notes, ""]
    for title, rs in sections.items():
        lines += [f"## {title}", ""]
        if title == "Fuzzed configs":
            lines += [cfg_summary, ""]
        lines += [table(rs), ""]
    Path(a.report).write_text("\n".join(lines))
    print(f"wrote {a.report}: {sum(r['ok'] for r in rows)}/{len(rows)} passed", flush=True)
    for r in rows:  # CI keeps stdout, not the report: name every failed case there
        if not r["ok"]:
            print(f"FAILED: {r['case']}\n  expected: {r['expect']}\n  got: {r['got'][:600]}", flush=True)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
