"""LoRA experts vs plain LoRA continuing a trained demo LM (``make demo``'s checkpoint) on one genre of plays:
training windows from the genre's training plays, validation loss on two held-out plays of that genre. The
same variants, trainable parameters and steps as :mod:`moesaic.examples.peft_genre` (q_proj and v_proj).

``python -m moesaic.examples.peft_lm CKPT --genre comedy --out runs/peft_lm [--steps 40] [--seeds 0 1 2]``
writes ``results.json`` and prints a table (docs/peft.md)."""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moesaic.examples.peft_genre import VARIANTS


def data(ckpt: Path, genre: str, seq: int, train_per_play: int, val_per_play: int) -> tuple[torch.Tensor, ...]:
    import tokenizers

    from moesaic.train.datasets.shakespeare import play_files
    from moesaic.train.datasets.shakespeare_genre import plays_by_genre

    tok_file = next(ckpt.rglob("tokenizer.json"))
    tok = tokenizers.Tokenizer.from_file(str(tok_file))
    plays = sorted(plays_by_genre()[genre])
    rng = random.Random(0)
    val = set(rng.sample(plays, 2))
    files = play_files()
    out: dict[bool, list[list[int]]] = {True: [], False: []}
    for p in plays:
        ids = tok.encode(files[p].read_text(errors="replace")).ids
        n = val_per_play if p in val else train_per_play
        out[p in val] += [ids[s:s + seq + 1] for s in (rng.randrange(0, len(ids) - seq - 1) for _ in range(n))]
    return torch.tensor(out[False]), torch.tensor(out[True])


def run_one(ckpt: Path, variant: dict[str, Any], seed: int, steps: int, batch: int, train: torch.Tensor,
            val: torch.Tensor) -> dict[str, Any]:
    from moesaic.interop.load import load_any
    from moesaic.moe.api import collect_aux_losses
    from moesaic.peft import LoRAExpertsConfig, inject_lora_experts_, trainable_parameters

    torch.manual_seed(seed)
    model = load_any(ckpt)
    inject_lora_experts_(model, LoRAExpertsConfig(target_modules=["q_proj", "v_proj"], **variant))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        logits = model(x[:, :-1]).logits
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (batch,), generator=g)
        loss = loss_of(train[idx]) + collect_aux_losses(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        vl = statistics.mean(float(loss_of(val[i:i + 32])) for i in range(0, len(val), 32))
    return {"val_loss": vl, "trainable_adapter": trainable_parameters(model), "seed": seed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("ckpt", type=Path)
    p.add_argument("--genre", default="comedy", choices=["comedy", "history", "tragedy"])
    p.add_argument("--out", default="runs/peft_lm")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train, val = data(a.ckpt, a.genre, 128, 32, 32)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    base = run_one(a.ckpt, {"rank": 1}, 0, 0, a.batch, train, val)["val_loss"]  # B = 0: the base model's loss
    for seed in a.seeds:
        for name, v in VARIANTS.items():
            results.setdefault(name, []).append(run_one(a.ckpt, v, seed, a.steps, a.batch, train, val))
            (out / "results.json").write_text(json.dumps({"base_val_loss": base, "runs": results}, indent=2))
    print(f"base model val loss on held-out {a.genre} plays: {base:.4f}")
    print(f"| variant | trainable | val loss, mean ± sd over {len(a.seeds)} seeds |\n|---|---:|---:|")
    for name, rs in results.items():
        losses = [float(r["val_loss"]) for r in rs]
        sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
        print(f"| {name} | {rs[0]['trainable_adapter']:,} | {statistics.mean(losses):.4f} ± {sd:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
