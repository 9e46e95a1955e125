"""The run config file that ``moesaic check`` and ``moesaic train`` read.

Every section of a run config has defaults, so an empty file, a file of comments only, or a file cut short
before its last sections would otherwise parse into the built-in toy regression run and train it with exit
0. A config file must therefore be a non-empty mapping that names the ``model``, ``data`` and ``train``
sections (``parallel`` may be left out). A file cut inside its last section still passes when what is left is
valid YAML with valid values: no rule on the content alone can tell that from a shorter config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from moesaic.core.config import load_yaml
from moesaic.core.errors import ConfigError
from moesaic.train.run_config import RunConfig, load_run_config

REQUIRED_SECTIONS: tuple[str, ...] = ("model", "data", "train")


def load_run_config_file(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Load, override and validate the run config in ``path``; refuse an empty or cut-short file."""
    raw: dict[str, Any] = dict(load_yaml(path))
    if not raw:
        raise ConfigError(path, None, "the config is empty (only blanks, comments or an empty mapping); "
                                      f"a run config needs the sections {', '.join(REQUIRED_SECTIONS)}",
                          show_value=False)
    missing = [s for s in REQUIRED_SECTIONS if s not in raw]
    try:
        cfg = load_run_config(data=raw, overrides=overrides)
    except ConfigError as e:
        # A misspelt section ("trian") is explained by the parser's "did you mean"; otherwise a file missing a
        # section may be cut short inside a value, so the line names the file and both problems.
        if missing and set(raw) <= {f.name for f in dataclasses.fields(RunConfig)}:
            raise _missing(path, missing, f"{e}; ") from None
        raise
    if missing:
        raise _missing(path, missing)
    return cfg


def _missing(path: str, missing: list[str], first: str = "") -> ConfigError:
    return ConfigError(path, None, f"{first}no {' / '.join(missing)} section; a run config needs the sections "
                                   f"{', '.join(REQUIRED_SECTIONS)} (a file cut short loses its last ones)",
                       show_value=False)
