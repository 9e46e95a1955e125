"""The text ``moesaic analyze`` runs a model over: passages with metadata.

``--data`` is a YAML run config whose ``data`` section names Shakespeare (``shakespeare`` or
``shakespeare_genre``): the passages are speeches sampled evenly from every play (routing is analysed,
not generalisation, so training plays count too), labelled with ``play``, ``genre`` (First Folio) and
``speaker``; or a plain text file: its paragraphs, labelled with the file name.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from pathlib import Path

from moesaic.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Passage:
    text: str
    meta: dict[str, str]


def passages_from_text(path: Path, limit: int) -> list[Passage]:
    """The file's paragraphs (blank-line separated), at most ``limit``, in order."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("--data", str(path), f"is not UTF-8 text ({e.reason} at byte {e.start})") from None
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", raw)]
    out = [Passage(p, {"source": path.name}) for p in paras if p][:limit]
    if not out:
        raise ConfigError("--data", str(path), "holds no text (empty or only whitespace)")
    return out


def passages_from_plays(plays: list[str], limit: int, seed: int = 0, min_chars: int = 40) -> list[Passage]:
    """Speeches of ``plays`` of at least ``min_chars`` characters, a seeded sample of ``limit`` spread
    evenly over the plays, labelled with play, genre and speaker."""
    from moesaic.train.datasets.shakespeare import play_files
    from moesaic.train.datasets.shakespeare_genre import FOLIO_GENRE
    from moesaic.train.datasets.speeches import speeches

    files = play_files()
    rng = random.Random(seed)
    per_play: list[list[Passage]] = []
    for play in plays:
        sp = speeches(files[play], min_chars)
        rng.shuffle(sp)
        per_play.append([Passage(text, {"play": play, "genre": FOLIO_GENRE.get(play, "unknown"),
                                        "speaker": f"{play}:{who}"}) for who, text in sp])
    out = [p for rnd in itertools.zip_longest(*per_play) for p in rnd if p is not None]  # one per play in turn
    return out[:limit]


def load_passages(data: str | Path, limit: int, seed: int = 0) -> list[Passage]:
    """Passages for ``--data`` (a YAML config or a text file); a typed error when there are none."""
    path = Path(data)
    if not path.is_file():
        raise ConfigError("--data", str(path), "no such file (give a YAML run config or a text file)")
    if path.suffix not in (".yaml", ".yml"):
        return passages_from_text(path, limit)
    from moesaic.train.run_config import load_run_config

    cfg = load_run_config(path)
    kind = cfg.data.kind
    if kind not in ("shakespeare", "shakespeare_genre"):
        raise ConfigError("data.kind", kind, "analyze reads text data: shakespeare or shakespeare_genre "
                                             "(or pass a plain text file)")
    from moesaic.train.datasets.shakespeare import play_files

    return passages_from_plays(list(play_files()), limit, seed)
