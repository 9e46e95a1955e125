"""Meta-DMoE on Shakespeare's genres (configs/zoo/metadmoe_*.yaml): per-domain teachers (comedy, history) distilled
into a small student, against the same student without teachers and distilled from one teacher trained on all
source domains; validation loss on held-out plays of the source genres (in-domain) and on tragedies (the held-out
domain), over seeds. Each seed trains its own teachers.

Usage: ``python benchmarks/zoo_metadmoe.py --steps 300 --seeds 0 --json s0.json`` (one process per seed), then
``python benchmarks/zoo_metadmoe.py --combine s0.json s1.json s2.json [--markdown OUT.md]``. One thread per run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from zoo_common import Runs, seed_table, seeds_cli, train

from moesaic.train.task import eval_batch_size, evaluate
from moesaic.train.trainer import Trainer

ZOO = Path(__file__).resolve().parents[1] / "configs" / "zoo"
OOD = ["hamlet", "lear", "macbeth", "othello"]
TEACHERS = {"comedy": "metadmoe_teacher_comedy.yaml", "history": "metadmoe_teacher_history.yaml",
            "all": "metadmoe_teacher_all.yaml"}
STUDENTS = {"student, distilled from the genre teachers (posterior gate)": "posterior",
            "student, distilled from the genre teachers (mean)": "mean",
            "student, distilled from one all-domain teacher": "all",
            "student without teachers": "none"}
ROWS = [*STUDENTS, "comedy teacher (reference)", "history teacher (reference)", "all-domain teacher (reference)"]
METRICS = ["in-domain val loss", "held-out domain (tragedy) val loss"]


def losses(t: Trainer) -> dict[str, float]:
    ood = dataclasses.replace(t.cfg.data, val_plays=OOD).build()
    bs = eval_batch_size(t.tc)
    return {METRICS[0]: evaluate(t.model, t.task, t.data.eval_batches(bs))["val_loss"],
            METRICS[1]: evaluate(t.model, t.task, ood.eval_batches(bs))["val_loss"]}


def run_seed(seed: int, steps: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    paths = {}
    for dom, recipe in TEACHERS.items():
        t = train(ZOO / recipe, [], seed, steps)
        t.save()
        paths[dom] = str(t.out)
        out[f"{'all-domain' if dom == 'all' else dom} teacher (reference)"] = losses(t)
        print(seed, dom, out[f"{'all-domain' if dom == 'all' else dom} teacher (reference)"], flush=True)
    for name, how in STUDENTS.items():
        if how == "none":
            sets = ["train.objective={kind: task}"]
        elif how == "all":
            sets = [f"train.objective.teachers=[{paths['all']}]"]
        else:
            sets = [f"train.objective.teachers=[{paths['comedy']}, {paths['history']}]",
                    f"train.objective.aggregation={how}"]
        out[name] = losses(train(ZOO / "metadmoe_student.yaml", sets, seed, steps))
        print(seed, name, out[name], flush=True)
    return out


def table(runs: Runs, steps: int) -> str:
    return seed_table(runs, ROWS, METRICS, "| model | " + " | ".join(METRICS) + " |",
                      f"Mean token cross-entropy (BPE, 1,024 ids) over 128 windows of 64 tokens; {steps} steps of 16 "
                      f"windows for every run, seeds {len(runs)}.")


if __name__ == "__main__":
    seeds_cli(run_seed, table)
