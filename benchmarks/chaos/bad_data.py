"""Bad data for benchmarks/chaos/run.py: `moesaic train` on a user's text file (`data.kind: text`) that is
empty, binary, vanishes or is rewritten while the loader reads it, and on tokenizer files that do not fit
(not a tokenizer, larger than the model's vocabulary, changed since the checkpoint). Every case expects one
typed error, exit 2 with one `error:` line, and no checkpoint: a fresh --out is not left behind at all, a
resumed one keeps its checkpoints verified and loadable."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

FAIL_ROW = "exit 2, {err}, one `error:` line naming the file; {after}"


def _cfg(base: dict, text: Path, **data: Any) -> dict:
    cfg = copy.deepcopy(base)
    cfg["data"] = {"kind": "text", "files": [str(text)], "tokenizer": "char", "seq_len": 16, "eval_windows": 4,
                   **data}
    cfg["model"].pop("vocab_size", None)
    cfg["train"].update(max_steps=4, save_every=2, eval_every=2)
    return cfg


def bad_data(run: Any, base: dict, write_cfg: Any, tb: Any) -> list[dict]:
    import moesaic
    from moesaic.train import checkpoint as ckpt
    from moesaic.train.datasets.shakespeare import play_files

    d = run.work / "data"
    d.mkdir()
    play = play_files()["macbeth"].read_text(encoding="utf-8")
    good = d / "macbeth.txt"
    good.write_text(play, encoding="utf-8")
    rows: list[dict] = []

    def one(name: str, cfg: dict, err: str, *args: str, fault: tuple[str, ...] = (), out: Path | None = None,
            named: str = "") -> dict:
        fresh = out is None
        out = out or d / f"out-{len(rows)}"
        before = sorted(p.name for p in out.glob("step-*")) if out.exists() else []
        r = run.train(write_cfg(d / f"c{len(rows)}.yaml", cfg), out, *args, fault=fault)
        lines = r["stderr"].strip().splitlines()
        one_line = bool(lines) and lines[-1].startswith("error: ") and named in lines[-1]
        if fresh:
            left = out.exists()
            after_ok, after = not left, "no --out folder left" if not left else f"LEFT {sorted(os.listdir(out))}"
        else:
            now = sorted(p.name for p in out.glob("step-*"))
            prev = ckpt.latest_valid(out, warn=lambda _m: None)
            after_ok = now == before and prev is not None and moesaic.load(prev).tokenizer is not None
            after = f"checkpoints {now} (before {before}), newest verifies and loads={after_ok}"
        ok = r["rc"] == 2 and r["type"] == err and one_line and after_ok and not tb(r) and not r["hang"]
        row = {"case": name, "expect": FAIL_ROW.format(err=err, after="no --out folder left" if fresh else
                                                       "checkpoints unchanged and loadable"),
               "got": f"rc {r['rc']}, {r['type']}: {lines[-1][:110] if lines else ''}; {after}", "ok": ok,
               "traceback": tb(r), "hang": r["hang"], "lost": not after_ok}
        rows.append(row)
        return row

    empty = d / "empty.txt"
    empty.write_bytes(b"")
    one("empty text file", _cfg(base, empty), "DataError", named=str(empty))
    garbage = d / "garbage.txt"
    garbage.write_bytes(os.urandom(1 << 16))
    one("binary garbage (64 KiB of random bytes)", _cfg(base, garbage), "DataError", named=str(garbage))
    latin = d / "latin1.txt"
    latin.write_bytes(play[:20000].encode("utf-8") + "Ægir, façade, naïve\n".encode("latin-1"))
    one("latin-1 text (not UTF-8)", _cfg(base, latin), "DataError", named=str(latin))
    big = d / "big.txt"  # more than one read chunk (1 MiB), so the fault lands mid-read
    for name, flag in (("vanishes", "--vanish"), ("is rewritten shorter", "--rewrite")):
        big.write_text(play * 12, encoding="utf-8")
        one(f"text file that {name} while the loader reads it (after its first 1 MiB)", _cfg(base, big),
            "DataError", fault=(flag, str(big)), named=str(big))
    not_tok = d / "not-a-tokenizer.json"
    not_tok.write_text('{"vocab": [1, 2')
    one("data.tokenizer_file that is not a tokenizer", _cfg(base, good, tokenizer_file=str(not_tok)), "DataError",
        named=str(not_tok))
    # a tokenizer file for the model, then one that does not match: larger vocabulary, changed on resume
    ref = d / "ref"
    r = run.train(write_cfg(d / "ref.yaml", _cfg(base, good)), ref, "--set", "train.max_steps=2")
    tok = d / "tokenizer.json"
    shutil.copy(ref / "step-00000002" / "tokenizer.json", tok)
    vocab = moesaic.load(ref / "step-00000002").tokenizer.vocab_size
    one(f"data.tokenizer_file with more ids ({vocab}) than model.vocab_size (40)",
        _cfg(base, good, tokenizer_file=str(tok)) | {"model": {**base["model"], "vocab_size": 40}}, "ConfigError",
        named="model.vocab_size")
    out = d / "resume-tok"
    r = run.train(write_cfg(d / "tok.yaml", _cfg(base, good, tokenizer_file=str(tok))), out, "--set",
                  "train.max_steps=2")
    ok_first = r["rc"] == 0
    other = d / "other.txt"
    other.write_text(play.upper() + "~{}|", encoding="utf-8")
    r2 = run.train(write_cfg(d / "other.yaml", _cfg(base, other)), d / "other", "--set", "train.max_steps=1")
    shutil.copy(d / "other" / "step-00000001" / "tokenizer.json", tok)  # same path, another tokenizer
    one("--resume after data.tokenizer_file was replaced by another tokenizer",
        _cfg(base, good, tokenizer_file=str(tok)), "CheckpointMismatchError", "--resume", out=out,
        named="tokenizer")
    rows[-1]["ok"] = rows[-1]["ok"] and ok_first and r2["rc"] == 0
    out2 = d / "resume-text"
    edited = d / "edited.txt"
    edited.write_text(play, encoding="utf-8")
    r = run.train(write_cfg(d / "ed.yaml", _cfg(base, edited)), out2, "--set", "train.max_steps=2")
    edited.write_text(play.replace("Macbeth", "Macbeht"), encoding="utf-8")  # same characters, other text
    one("--resume after the training text was edited (same characters, so the same tokenizer)",
        _cfg(base, edited), "CheckpointMismatchError", "--resume", out=out2, named="text_sha256")
    rows[-1]["ok"] = rows[-1]["ok"] and r["rc"] == 0
    # and the text file that is fine trains
    r = run.train(write_cfg(d / "good.yaml", _cfg(base, good)), d / "good")
    m = moesaic.load(d / "good" / "step-00000004") if r["rc"] == 0 else None
    ok = r["rc"] == 0 and m is not None and m.tokenizer is not None and not tb(r)
    rows.append({"case": "a good UTF-8 text file (Macbeth)", "expect": "exit 0, 4 steps, checkpoint with its "
                 "tokenizer", "got": f"rc {r['rc']}, loads with tokenizer={m is not None and m.tokenizer is not None}",
                 "ok": ok, "traceback": tb(r), "hang": r["hang"], "lost": not ok})
    return rows
