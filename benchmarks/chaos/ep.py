"""Expert parallelism for benchmarks/chaos/run.py: `moesaic train --nproc 4` with `parallel.ep_size: 4` on
gloo, one rank SIGKILLed mid-step (inside a module forward) and mid-save (between the model's and the
optimizer's gather, and the writer after its files are written). Expected: the command exits 2 with
RankFailedError naming the killed rank, the other ranks end within the process-group timeout, no traceback,
no checkpoint published after the last good one, and `--resume` continues bitwise equal to an unbroken run."""

from __future__ import annotations

import copy
from typing import Any

PG_TIMEOUT = 30  # MOESAIC_PG_TIMEOUT of every run (seconds)


def ep_kills(run: Any, base: dict, write_cfg: Any, same_as: Any, tb: Any, short: bool) -> list[dict]:
    cfg = copy.deepcopy(base)
    cfg["parallel"] = {"ep_size": 4}
    cfg["train"].update(max_steps=8, batch_size=8, save_every=4, eval_every=4)
    path = write_cfg(run.work / "ep.yaml", cfg)
    env = dict(run.env, MOESAIC_PG_TIMEOUT=str(PG_TIMEOUT))
    old_env, run.env = run.env, env
    try:
        ref = run.work / "ep-ref"
        r = run.train(path, ref, "--nproc", "4", timeout=300)
        ref_wall = r["wall"]
        if r["rc"] != 0:
            return [{"case": "EP reference run (4 ranks)", "expect": "exit 0", "got": f"rc {r['rc']}: "
                     f"{r['stderr'][-300:]}", "ok": False, "traceback": tb(r), "hang": r["hang"], "lost": False}]
        cases = [("rank 2 killed mid-step (its 3rd module forward of step 6)",
                  ("--kill", "forward", "--step", "5", "--nth", "3", "--rank", "2"), 2),
                 ("rank 1 killed mid-save (step 8: model gathered, optimizer not)",
                  ("--kill", "gather", "--step", "8", "--rank", "1"), 1)]
        if not short:
            cases.append(("rank 0 (the writer) killed mid-save (step 8: files written, no manifest)",
                          ("--kill", "point:checkpoint.after_files", "--step", "8", "--rank", "0"), 0))
        rows = []
        for i, (name, fault, killed) in enumerate(cases):
            out = run.work / f"ep-{i}"
            r = run.train(path, out, "--nproc", "4", fault=fault, timeout=300)
            lines = r["stderr"].strip().splitlines()
            last = next((ln for ln in reversed(lines) if ln.startswith("error: rank ") and " of 4 " in ln), "")
            survivors = [ln for ln in lines if ln.startswith("error: rank ") and "a collective failed" in ln]
            steps = sorted(p.name for p in out.glob("step-*"))
            latest = (out / "LATEST").read_text().strip() if (out / "LATEST").exists() else None
            published_ok = steps == ["step-00000004"] and latest in (None, "step-00000004")
            in_time = r["wall"] < ref_wall + PG_TIMEOUT
            r2 = run.train(path, out, "--nproc", "4", "--resume", timeout=300)
            equal = r2["rc"] == 0 and same_as(ref, out, 8)
            ok = (r["rc"] == 2 and r["type"] == "RankFailedError" and last.startswith(f"error: rank {killed} of 4 ")
                  and "SIGKILL" in last and published_ok and in_time and not tb(r) and not tb(r2) and equal)
            rows.append({"case": f"EP 4 ranks, {name}", "expect": f"exit 2, RankFailedError naming rank {killed} "
                         f"(SIGKILL), others end within ref + {PG_TIMEOUT} s, only step 4 published; --resume "
                         "bitwise equal",
                         "got": f"rc {r['rc']}, {r['type']}: '{last[:80]}...'; {len(survivors)} survivors with one "
                                f"line each; {r['wall']:.0f} s (ref {ref_wall:.0f} s); published {steps} "
                                f"LATEST {latest}; resume rc {r2['rc']}, {'bitwise equal' if equal else 'DIFFERENT'}",
                         "ok": ok, "traceback": tb(r) or tb(r2), "hang": r["hang"] or r2["hang"],
                         "lost": not published_ok or not equal})
        return rows
    finally:
        run.env = old_env

