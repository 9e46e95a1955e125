"""AdvMoE on digits (configs/zoo/advmoe_vit_digits.yaml): clean and robust accuracy (L-inf PGD, eps 0.05, 20 steps
from a seeded random start, stronger than the 2 training steps) of the multi-task ViT-MoE trained with AdvMoE's
alternating router/expert updates, with joint adversarial training, without adversarial training, and of the
dense twin (equal active parameters) with and without joint adversarial training, over seeds.

Usage: ``python benchmarks/zoo_advmoe.py --steps 250 --seeds 0 --json s0.json`` (one process per seed), then
``python benchmarks/zoo_advmoe.py --combine s0.json s1.json s2.json [--markdown OUT.md]``. One thread per run.
"""

from __future__ import annotations

from pathlib import Path

from zoo_common import Runs, seed_table, seeds_cli, train

from moesaic.train.adversarial import robust_accuracy
from moesaic.train.task import evaluate

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "zoo" / "advmoe_vit_digits.yaml"
EPS, EVAL_STEPS = 0.05, 20
VARIANTS = {"MoE, AdvMoE (alternating router / expert steps)": [],
            "MoE, joint adversarial training": ["train.objective.alternate=false"],
            "MoE, no adversarial training": ["train.objective={kind: task}"],
            "dense twin, joint adversarial training": ["model.moe=null", "train.objective.alternate=false"],
            "dense twin, no adversarial training": ["model.moe=null", "train.objective={kind: task}"]}
METRICS = ["clean accuracy", "robust accuracy"]


def run_seed(seed: int, steps: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, sets in VARIANTS.items():
        t = train(RECIPE, sets, seed, steps)
        batches = t.data.eval_batches(256)
        out[name] = {"clean accuracy": evaluate(t.model, t.task, batches)["val_accuracy"],
                     "robust accuracy": robust_accuracy(t.model, t.task, batches, EPS, EVAL_STEPS)}
        print(seed, name, out[name], flush=True)
    return out


def table(runs: Runs, steps: int) -> str:
    return seed_table(runs, list(VARIANTS), METRICS, "| model | " + " | ".join(METRICS) + " |",
                      f"Accuracy over the 3 tasks x 360 held-out images; PGD L-inf "
                      f"eps {EPS}, {EVAL_STEPS} steps of 2.5 eps / {EVAL_STEPS}, seeded random start; {steps} "
                      f"training steps, seeds {len(runs)}.")


if __name__ == "__main__":
    seeds_cli(run_seed, table)
