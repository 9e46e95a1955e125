"""The demo's output folder: what ``--out DIR`` may replace.

A rerun of the demo must start from scratch (the trainer refuses a folder that already holds checkpoints),
but ``--out`` is a path the user types, so the demo deletes only what an earlier demo run wrote there: the
``moe/`` and ``dense/`` run folders of a folder that carries the demo's marker file. Other entries next to
them are left alone. A non-empty folder without the marker is refused, unless it holds nothing but ``moe/``
and ``dense/`` run folders of the trainer (the layout of a demo run from before the marker existed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from moesaic.core.errors import ConfigError

MARKER = ".moesaic-demo"
RUN_FOLDERS: tuple[str, ...] = ("moe", "dense")
_MARKER_TEXT = ("Written by `python -m moesaic.examples.demo`. The next demo run with this --out deletes and "
                "rewrites moe/ and dense/ here; nothing else.\n")


def prepare_demo_folder(out: Path) -> None:
    """Make ``out`` ready for a fresh demo run, or raise :class:`ConfigError` naming ``--out`` and the rule."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError("--out", str(out), "is not a folder")
    if out.exists():
        entries = {p.name for p in out.iterdir()}
        if entries and MARKER not in entries and not _is_old_demo_folder(out, entries):
            raise ConfigError("--out", str(out), "is a non-empty folder that no demo run wrote (no "
                                                  f"{MARKER} file); give a new or empty folder")
        for name in RUN_FOLDERS:
            run = out / name
            if run.is_symlink() or run.is_file():
                raise ConfigError("--out", str(out), f"{name} is not a folder of a demo run; move it away")
            if run.exists():
                shutil.rmtree(run)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(_MARKER_TEXT, encoding="utf-8")


def _is_old_demo_folder(out: Path, entries: set[str]) -> bool:
    """Only ``moe/`` and ``dense/``, each a real folder with the trainer's ``metrics.jsonl`` in it."""
    return entries <= set(RUN_FOLDERS) and all(
        (out / n).is_dir() and not (out / n).is_symlink() and (out / n / "metrics.jsonl").is_file()
        for n in entries)
