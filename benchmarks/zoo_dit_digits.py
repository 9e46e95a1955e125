"""DiT-MoE (configs/zoo/dit_moe_digits.yaml) against its dense twin (equal active parameters), 3 seeds: 500
generated digits (50 per class, ancestral DDPM sampling, classifier-free guidance ``--guidance``) judged by
a digits classifier trained on the real training images (scikit-learn MLP): accuracy (the classifier agrees
with the requested class), mean confidence in the requested class, and the Frechet distance between
generated and real validation images in the classifier's hidden-layer features (FID's recipe, Heusel et
al. 2017, with a digits classifier instead of Inception).

Usage: ``python benchmarks/zoo_dit_digits.py [--steps 800] [--seeds 0,1,2] [--guidance 1.0] [--markdown OUT]
[--json OUT]``; seeds can run in separate processes (``--seeds 1 --json s1.json``) and be combined with
``--combine s0.json s1.json s2.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg
from zoo_common import train

from moesaic.models.dit import sample

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "zoo" / "dit_moe_digits.yaml"


def judge(train_x: np.ndarray, train_y: np.ndarray) -> Any:
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=0).fit(train_x, train_y)


def features(clf: Any, x: np.ndarray) -> np.ndarray:
    """The classifier's hidden layer (ReLU) for images in [0, 1]."""
    return np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def evaluate(model: torch.nn.Module, clf: Any, real_val: np.ndarray, guidance: float, seed: int) -> dict[str, float]:
    labels = torch.arange(10).repeat_interleave(50)
    x = sample(model, labels, guidance=guidance, generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    gen = ((x.clamp(-1, 1) + 1) / 2).reshape(len(labels), -1).numpy()
    proba = clf.predict_proba(gen)
    return {"accuracy": float((proba.argmax(1) == labels.numpy()).mean()),
            "confidence": float(proba[np.arange(len(labels)), labels.numpy()].mean()),
            "frechet": frechet(features(clf, gen), features(clf, real_val))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--markdown", default="")
    ap.add_argument("--json", default="", help="write the per-run numbers here")
    ap.add_argument("--combine", nargs="*", default=[], help="only combine --json files into the table")
    args = ap.parse_args()
    if args.combine:
        parts = [json.loads(Path(f).read_text()) for f in args.combine]
        res = {k: [r for p in parts for r in p["res"][k]] for k in parts[0]["res"]}
        return table(res, parts[0]["base"], args, sorted(s for p in parts for s in p["seeds"]))
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    res: dict[str, list[dict[str, float]]] = {"DiT-MoE (8 experts top-2 + shared)": [], "dense DiT": []}
    clf = None
    for seed in seeds:
        for name, sets in zip(res, ([], ["model.moe=null"])):
            t = train(RECIPE, sets, seed, args.steps)
            data: Any = t.data
            if clf is None:
                clf = judge(data.train_x.reshape(len(data.train_x), -1).numpy(), data.train_y.numpy())
                real = data.val_x.reshape(len(data.val_x), -1).numpy()
                half = len(real) // 2
                base = {"accuracy": float(clf.score(real, data.val_y.numpy())),
                        "frechet": frechet(features(clf, real[:half]), features(clf, real[half:]))}
            r = evaluate(t.model, clf, real, args.guidance, seed)
            r["val_loss"] = t.evaluate()["val_loss"]
            res[name].append(r)
            print(name, seed, r, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"res": res, "base": base, "seeds": seeds}))
    table(res, base, args, seeds)


def table(res: dict[str, list[dict[str, float]]], base: dict[str, float], args: argparse.Namespace,
          seeds: list[int]) -> None:
    keys = ["val_loss", "accuracy", "confidence", "frechet"]
    lines = ["| model | denoising val loss | classifier accuracy | confidence | Frechet distance |",
             "|---|---|---|---|---|"]
    for name, rs in res.items():
        def cell(xs: list[float]) -> str:
            return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.4f}"

        cells = [cell([r[k] for r in rs]) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"| real validation images | | {base['accuracy']:.4f} | | {base['frechet']:.4f} (half vs half) |")
    md = "\n".join(lines) + f"\n\n{args.steps} steps, seeds {seeds}, guidance {args.guidance}, 500 samples per run.\n"
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md)


if __name__ == "__main__":
    main()
