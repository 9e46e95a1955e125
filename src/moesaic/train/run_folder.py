"""The run folder ``--out``: what ``moesaic train`` may write into.

``--out`` is a path the user types, and the trainer writes ``config.yaml`` and ``metrics.jsonl`` there (and,
without ``--resume``, drops the records of an earlier run of the same folder that never saved). So it only
writes into a folder that is new, empty, or a run folder of its own: one that carries the marker file
:data:`MARKER` (written on the first run), or the ``LATEST`` file / ``step-*`` checkpoints of a run from
before the marker existed. Any other non-empty folder is refused with a one-line :class:`ConfigError`.
"""

from __future__ import annotations

from pathlib import Path

from moesaic.core.errors import ConfigError

MARKER = ".moesaic-run"
_MARKER_TEXT = ("Written by `moesaic train`: this folder holds one training run (config.yaml, metrics.jsonl, "
                "step-*/ checkpoints). A later run with this --out may rewrite those files.\n")
#: Transient files other ranks of the same run may create while the writer looks (trainer.check_writable).
_TRANSIENT = ".write-probe-"


def is_run_folder(out: Path) -> bool:
    """``out`` carries the marker, or the ``LATEST`` file or a ``step-*`` folder of an older run."""
    return (out / MARKER).is_file() or (out / "LATEST").is_file() or any(
        p.is_dir() for p in out.glob("step-*"))


def claim_run_folder(out: Path) -> None:
    """Refuse a non-empty folder that no training run wrote; otherwise make it and write the marker."""
    if out.is_symlink() and not out.is_dir():
        raise ConfigError("--out", str(out), "is a dangling link")
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", str(out), "is not a folder")
    if out.is_dir():
        entries = [p for p in out.iterdir() if not p.name.startswith(_TRANSIENT)]
        if entries and not is_run_folder(out):
            raise ConfigError("--out", str(out), f"is a non-empty folder that no training run wrote (no {MARKER} "
                                                  "file); give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        (out / MARKER).write_text(_MARKER_TEXT, encoding="utf-8")


#: What a start writes into a new run folder before its first step (besides per-process write probes).
_START_FILES = {MARKER, "config.yaml", "metrics.jsonl"}


def discard_new_run_folder(out: Path) -> None:
    """Remove ``out`` after a failed start, when this command created it and it holds only what a start
    writes (the marker, config.yaml, an empty metrics.jsonl, tensorboard events); anything else stays."""
    if not out.is_dir() or out.is_symlink():
        return
    entries = list(out.iterdir())
    ours = all(p.name in _START_FILES or p.name.startswith(_TRANSIENT) or p.name == "tensorboard" for p in entries)
    if not ours or any(p.name.startswith(("step-", ".step-")) or p.name == "LATEST" for p in entries):
        return
    for p in entries:
        if p.is_dir():
            for q in sorted(p.rglob("*"), reverse=True):
                q.rmdir() if q.is_dir() else q.unlink()
            p.rmdir()
        else:
            p.unlink(missing_ok=True)
    out.rmdir()
