"""What ``moesaic convert VERB`` reads and writes: inputs through :func:`moesaic.load`, the output as a
moesaic checkpoint written atomically.

The output folder ``OUT`` is written beside itself under a temporary name (``.OUT.convert-PID``) and renamed
into place only once complete, so a failed verb never leaves a partial ``OUT``. ``OUT`` must be new, empty,
or an earlier ``moesaic convert`` output (``LATEST`` + ``step-00000000`` holding ``convert.json``); any other
folder is refused (never deleted or overwritten).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from moesaic.core.config import dump_yaml, to_dict
from moesaic.core.errors import CheckpointError, ConfigError

#: The provenance file of a converted checkpoint (verb, inputs, config); marks OUT as ours.
PROVENANCE = "convert.json"
_OURS = frozenset({"LATEST", "step-00000000"})


def load_inputs(paths: Sequence[str | os.PathLike[str]], lazy: bool = False) -> list[nn.Module]:
    """Every input (a moesaic checkpoint or a Hugging Face folder) through :func:`moesaic.load`, in train
    mode; a missing path raises :class:`CheckpointError` naming it. With ``lazy`` (a verb's ``stream:
    true``) each is a meta skeleton whose tensors stay on disk until the output is written."""
    from moesaic.interop.load import load_any

    models = []
    for p in paths:
        if not Path(p).exists():
            raise CheckpointError(f"input not found: {p} (give a moesaic checkpoint or a Hugging Face folder)")
        models.append(load_any(p, lazy=lazy).train())
    return models


def check_out_folder(out: str | os.PathLike[str]) -> Path:
    """``OUT`` must be new, empty or an earlier convert output; returns it as a Path."""
    o = Path(out)
    if o.exists() and not o.is_dir():
        raise ConfigError("OUT", str(o), "is a file, not a folder")
    if o.is_dir():
        names = {p.name for p in o.iterdir()}
        if names and not (names <= _OURS and (o / "step-00000000" / PROVENANCE).is_file()):
            raise ConfigError("OUT", str(o), "is a non-empty folder that no moesaic convert wrote; give a new or "
                                             "empty folder")
    return o


def _config_yaml(model: nn.Module) -> str:
    """The run config of the source checkpoint with the converted model section (a Hugging Face input has
    none: only ``model``)."""
    cfg: Any = model.cfg
    run_cfg = getattr(model, "run_config", None)
    data = to_dict(run_cfg) if run_cfg is not None else {}
    data["model"] = to_dict(cfg)
    return dump_yaml(data)


def _tokenizer_json(model: nn.Module) -> str | None:
    tok = getattr(model, "tokenizer", None)
    to_json = getattr(tok, "to_json", None)
    return str(to_json()) if callable(to_json) else None


def save_converted(model: nn.Module, out: str | os.PathLike[str], provenance: dict[str, Any]) -> Path:
    """Write ``model`` as the moesaic checkpoint ``OUT/step-00000000`` (``OUT/LATEST`` names it), atomically:
    built under a temporary sibling and renamed into place. Returns the step folder."""
    from moesaic.train.checkpoint import gather_model_state, save_checkpoint
    from moesaic.transforms.upcycle_stream import streamed_state

    o = check_out_folder(out)
    o.parent.mkdir(parents=True, exist_ok=True)
    tmp = o.parent / f".{o.name}.convert-{os.getpid()}"
    old = o.parent / f".{o.name}.old-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        state = streamed_state(model) if getattr(model, "lazy_state", None) else gather_model_state(model)
        save_checkpoint(tmp, 0, config_yaml=_config_yaml(model), model_state=state,
                        tokenizer_json=_tokenizer_json(model),
                        extra_files={PROVENANCE: json.dumps(provenance, indent=1, sort_keys=True).encode()})
        if o.exists():  # empty, or an earlier convert output (checked above): move it aside, then swap
            os.rename(o, old)
        try:
            os.rename(tmp, o)
        except OSError:
            if old.exists() and not o.exists():
                os.rename(old, o)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return o / "step-00000000"
