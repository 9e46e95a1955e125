"""BAM on Shakespeare (Zhang et al. 2024, "BAM! Just Like That"): two dense seeds branched from one dense model
and trained on different genres, then upcycled three ways and continued on the same tokens, for several seeds.

Per seed: a dense base (the demo's dense twin in the reduced shape of :mod:`upcycle_shakespeare`) trains
``--base`` steps on every training play; two copies branch from it for ``--branch`` steps each, one on the
comedies, one on the tragedies and histories (the base's tokenizer; validation plays excluded), as BAM's
specialised dense seeds; then
* ``copy``: sparse upcycling of the comedy seed alone (8 copies, top-2, renormalised);
* ``multiplet``: FFN experts from both seeds (expert e from seed e % 2), non-expert parameters averaged;
* ``bam``: the same FFN experts plus the attention upcycled into ``moa`` (one expert per seed, each with its own
  q/k/v/o, soft routing), embeddings and norms averaged;
and each continues ``--continue`` steps on every training play with the same data seed. Writes
``results-SEED.json`` per seed (seeds may run as separate processes into one ``--out``), and ``table.md`` and
``curves.png`` over every seed found there.

``python -m moesaic.examples.bam_shakespeare --out runs/bam [--seeds 0 1 2] [--base 150] [--branch 75]
[--continue 150]`` (docs/convert.md, "BAM").
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any, cast

import torch

from moesaic.core.config import to_dict
from moesaic.distributed.expert_state import local_model_state
from moesaic.examples.demo import count_params
from moesaic.examples.upcycle_shakespeare import experiment_args, flops_per_token, run, val_loss
from moesaic.models.attention_moa import MixtureOfAttentionHeads
from moesaic.train.checkpoint import load_model
from moesaic.train.datasets.shakespeare import play_files
from moesaic.train.datasets.shakespeare_genre import plays_by_genre
from moesaic.train.run_config import RunConfig, load_run_config
from moesaic.transforms.upcycle import UpcycleConfig, upcycle_

VARIANTS = ("copy", "multiplet", "bam")


def bam_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """:func:`flops_per_token` plus the scores and values of every further attention expert of a ``moa`` layer
    (each expert attends with its own keys and values: ``2 * 2 * (S/2) * D`` per expert and layer)."""
    cfg: Any = model.cfg
    d_model = int(cfg.d_model)
    extra = sum(m.cfg.num_experts - 1 for m in model.modules() if isinstance(m, MixtureOfAttentionHeads))
    return flops_per_token(model, seq_len) + 2.0 * extra * seq_len * d_model


def branch_config(base: RunConfig, plays: list[str], tokenizer: Path, seed: int, steps: int) -> RunConfig:
    """``base`` trained on ``plays`` only (``data: text`` with the base run's tokenizer and validation plays)."""
    raw = copy.deepcopy(to_dict(base))
    files = play_files()
    val = list(cast(Any, base.data).val_plays)
    raw["data"] = {"kind": "text", "files": [str(files[p]) for p in plays], "val_files": [str(files[p]) for p in val],
                   "tokenizer_file": str(tokenizer), "seq_len": raw["data"]["seq_len"],
                   "eval_windows": raw["data"]["eval_windows"]}
    raw["train"].update(seed=seed, max_steps=steps, eval_every=steps)
    return load_run_config(data=raw)


def main(argv: list[str] | None = None) -> int:
    a, base = experiment_args(argv, __doc__.split("\n\n")[0], "runs/bam_shakespeare",
                              [("--base", "base", 150, "dense steps on every training play"),
                               ("--branch", "branch", 75, "steps of each genre seed"),
                               ("--continue", "cont", 150, "steps of every continuation")])
    out = Path(a.out)
    val = set(cast(Any, base.data).val_plays)
    genres = plays_by_genre()
    halves = {"comedy": [p for p in genres["comedy"] if p not in val],
              "tragedy+history": [p for g in ("tragedy", "history") for p in genres[g] if p not in val]}
    results: dict[str, Any] = {"base_steps": a.base, "branch_steps": a.branch, "continue_steps": a.cont,
                               "seeds": a.seeds, "halves": halves, "runs": {}}
    for seed in a.seeds:
        pre = dataclasses.replace(base, train=dataclasses.replace(base.train, seed=seed, max_steps=a.base,
                                                                  eval_every=a.base))
        run(pre, out / f"base-{seed}")
        tok = sorted((out / f"base-{seed}").glob("step-*/tokenizer.json"))[-1]
        base_state = local_model_state(load_model(out / f"base-{seed}"))
        seeds = []
        for j, plays in enumerate(halves.values()):
            d = out / f"seed{j}-{seed}"
            run(branch_config(pre, plays, tok, 100 * seed + j, a.branch), d, base_state)
            seeds.append(load_model(d).train())
        ctr = dataclasses.replace(base.train, seed=1000 + seed, max_steps=a.cont, eval_every=a.eval_every)
        settings = {"copy": (UpcycleConfig(seed=seed), []),
                    "multiplet": (UpcycleConfig(seed=seed, non_expert="average"), seeds[1:]),
                    "bam": (UpcycleConfig(seed=seed, non_expert="average", attention="moa"), seeds[1:])}
        rec: dict[str, Any] = {"seed_val_loss": [val_loss(dataclasses.replace(pre, train=ctr), s, out / "scratch")
                                                 for s in seeds]}
        for name in VARIANTS:
            ucfg, extra = settings[name]
            first = load_model(out / f"seed0-{seed}").train()
            moe: Any = upcycle_(first, ucfg, extra=extra)
            cfg = dataclasses.replace(pre, model=moe.cfg, train=ctr)
            step0 = val_loss(cfg, moe, out / "scratch")
            curve = [(0, step0), *run(cfg, out / f"{name}-cont-{seed}", local_model_state(moe))]
            total, active = count_params(moe)
            rec[name] = {"curve": curve, "total_params": total, "active_params": active,
                         "flops_per_token": bam_flops_per_token(moe, cfg.data.seq_len),  # type: ignore[attr-defined]
                         "model": to_dict(moe.cfg)}
        (out / f"results-{seed}.json").write_text(json.dumps({**results, "runs": {str(seed): rec}}, indent=1))
        write_report(out)
    return 0


def _ms(v: list[float], sign: str = "") -> str:
    return f"{statistics.mean(v):{sign}.4f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}"


def write_report(out: Path) -> None:
    """``table.md`` (mean ± std over the seeds of every ``results-SEED.json`` in ``out``, paired differences)
    and ``curves.png``; seeds may run as separate processes into one ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for p in sorted(out.glob("results-*.json")) for r in json.loads(p.read_text())["runs"].values()]
    steps = [s for s, _ in runs[0]["copy"]["curve"]]
    loss = {n: {s: [dict(r[n]["curve"])[s] for r in runs] for s in steps} for n in VARIANTS}
    lines = [f"{len(runs)} seed(s); genre seeds' own val loss: comedy {_ms([r['seed_val_loss'][0] for r in runs])}, "
             f"tragedy+history {_ms([r['seed_val_loss'][1] for r in runs])}", "",
             "| step | copy (comedy seed) | multiplet (FFN experts) | BAM (FFN + attention experts) | multiplet - copy "
             "| BAM - copy | BAM - multiplet |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for s in steps:
        d = [[a - b for a, b in zip(loss[x][s], loss[y][s], strict=True)]
             for x, y in (("multiplet", "copy"), ("bam", "copy"), ("bam", "multiplet"))]
        lines.append(f"| {s} | " + " | ".join(_ms(loss[n][s]) for n in VARIANTS) + " | "
                     + " | ".join(_ms(v, "+") for v in d) + " |")
    r0 = runs[0]
    lines += ["", "| model | total params | active params | FLOPs/token (forward) |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {r0[n]['total_params']:,} | {r0[n]['active_params']:,} | {r0[n]['flops_per_token']:,.0f} |"
              for n in VARIANTS]
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in VARIANTS:
        m = [statistics.mean(loss[n][s]) for s in steps]
        sd = [statistics.stdev(loss[n][s]) if len(runs) > 1 else 0.0 for s in steps]
        ax.plot(steps, m, label=n)
        ax.fill_between(steps, [x - y for x, y in zip(m, sd, strict=True)], [x + y for x, y in zip(m, sd, strict=True)],
                        alpha=0.2)
    ax.set_xlabel("continued steps after upcycling")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"BAM vs multiplet vs copy upcycling ({len(runs)} seeds, ± 1 std)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
