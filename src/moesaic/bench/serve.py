"""serve: `moesaic serve` under load on loopback: 1 client against 16 concurrent clients, for the serial queue
(``--max-batch 1``) and continuous batching (``--max-batch 16``).

Each configuration starts the real server (``python -m moesaic serve --port 0``, the queue bound at least
the client count), warms it up, then sends a fixed number of greedy completions (different prompts, the
same ``max_tokens``) from 1 client one after another, and the same number from 16 client threads at once.
Reported per round: errors, requests/s, generated tokens/s, p50 and p99 latency; and the fraction of the
16-client completions identical to the 1-client completion of the same prompt (batched decode steps may
round differently). The default model is a 4-layer d=256 Mixtral-style model with 8 experts (top-2) and
random weights, saved as a Hugging Face folder with a byte-level BPE tokenizer (timings need no training);
``--checkpoint`` serves any moesaic checkpoint or Hugging Face folder instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

TARGET = "serve"
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. "
        "Now is the winter of our discontent made glorious summer by this sun of York. All the world's a stage, "
        "and all the men and women merely players; they have their exits and their entrances. ")
PROMPTS = [" ".join(TEXT.split()[i:i + 4 + i % 5]) for i in range(0, 64, 4)]  # 16 prompts of 4-8 words


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="model to serve (default: the random 4-layer Mixtral)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=64, help="requests per round (fixed count)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="--max-batch values to compare")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--json", default=None, help="write the results to this file")


def _model_folder(root: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moesaic.train.tokenizer import BPETokenizer

    tok = BPETokenizer.train([TEXT] * 4, vocab_size=512)
    cfg = MixtralConfig(vocab_size=tok.vocab_size, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=8, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=512, eos_token_id=tok.eos_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(root))
    tok.save(root / "tokenizer.json")
    return root


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], float]:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, {}, time.perf_counter() - t0
    except OSError:
        return 0, {}, time.perf_counter() - t0


def _round(url: str, model: str, clients: int, n: int, max_tokens: int) -> dict[str, Any]:
    """``n`` requests (prompt i % 16) from ``clients`` threads; latencies, errors, texts by prompt index."""
    todo = list(range(n))
    lock = threading.Lock()
    rows: list[tuple[int, int, float, str, int]] = []

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            status, body, secs = _post(url, {"model": model, "prompt": PROMPTS[i % len(PROMPTS)],
                                             "max_tokens": max_tokens, "temperature": 0})
            text = body["choices"][0]["text"] if status == 200 else ""
            toks = body["usage"]["completion_tokens"] if status == 200 else 0
            with lock:
                rows.append((i, status, secs, text, toks))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r[2] for r in rows)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return {"clients": clients, "requests": n, "errors": sum(r[1] != 200 for r in rows), "wall_s": wall,
            "req_per_s": n / wall, "tok_per_s": sum(r[4] for r in rows) / wall, "p50_s": q[49], "p99_s": q[98],
            "texts": {r[0]: r[3] for r in rows}}


def run(args: argparse.Namespace) -> int:
    from moesaic.serve import launch

    print(f"load average {os.getloadavg()[0]:.2f} (the machine may be shared)  server threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else _model_folder(Path(tmp) / "mixtral-random")
        results = []
        for b in args.batches:
            queue = max(args.clients, 1)
            proc, url = launch(ckpt, ["--threads", str(args.threads), "--max-batch", str(b), "--max-queue",
                                      str(queue), "--model-name", "bench"])
            try:
                _round(url, "bench", 2, 4, args.max_tokens)  # warm-up
                one = _round(url, "bench", 1, args.requests, args.max_tokens)
                many = _round(url, "bench", args.clients, args.requests, args.max_tokens)
            finally:
                proc.terminate()
                proc.wait(60)
            ref = {i % len(PROMPTS): t for i, t in one["texts"].items()}
            same = sum(t == ref[i % len(PROMPTS)] for i, t in many["texts"].items())
            for r in (one, many):
                r.pop("texts")
                results.append({"max_batch": b, **r, **({"identical_to_single": same / args.requests}
                                                       if r is many else {})})
    print(f"{'max_batch':>9} {'clients':>7} {'errors':>6} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} "
          f"{'same as 1 client':>16}")
    for r in results:
        same_txt = f"{r['identical_to_single']:.0%}" if "identical_to_single" in r else "-"
        print(f"{r['max_batch']:>9} {r['clients']:>7} {r['errors']:>6} {r['req_per_s']:>7.2f} {r['tok_per_s']:>7.1f} "
              f"{r['p50_s']:>7.3f} {r['p99_s']:>7.3f} {same_txt:>16}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if any(r["errors"] for r in results) else 0
