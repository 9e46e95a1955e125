"""Checkpoints: one directory per saved step, published atomically, verified by hashes on every load.

Layout of ``OUT/step-00000020/``: ``config.yaml`` (the resolved run config), ``model.safetensors``
(global parameter names; tied weights stored once), ``optimizer.pt`` (optimizer state, loaded with
``weights_only=True``), ``trainer_state.json`` (step, schedule, data position), ``rng.pt`` (torch CPU and
device RNG), ``tokenizer.json`` when the data has one, and ``manifest.json`` last: per-file size and
sha256, the step, the expert weight layout tag and a hash of itself (so a garbled manifest is detected).

Publication: files go to ``.step-N.tmp/``, are fsynced, the directory is
fsynced and renamed to ``step-N/``, the parent is fsynced, then ``LATEST`` is replaced via ``os.replace``.
A kill at any instant leaves either the previous state or the new complete one; the crash tests kill the
process at the fault points ``checkpoint.after_files``, ``checkpoint.before_publish`` and
``checkpoint.after_publish`` (:mod:`moesaic.train.faults`).

Expert parallelism hook: :func:`save_checkpoint` takes the model state as a dict of *global* names
(``gather_model_state``, replaceable); a sharded trainer gathers (or writes per-rank files and lists them
in ``extra_files``) and loads through ``scatter`` in :func:`load_model_state`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from moesaic.core.errors import CheckpointCorruptError, CheckpointError, CheckpointMismatchError, OutputWriteError
from moesaic.distributed.expert_state import local_model_state, unique_state_names
from moesaic.train.faults import fault_point
from moesaic.train.stream_safetensors import LazyTensor, file_digest, lazy, write_lazy

#: The saved state of an unsharded model, tied tensors once (expert parallelism gathers global experts).
gather_model_state = local_model_state

FORMAT = 1
MANIFEST = "manifest.json"
REQUIRED = ("config.yaml", "model.safetensors")
TRAINING = ("optimizer.pt", "trainer_state.json", "rng.pt")
#: Stacked expert weights are [E, out, in] (see moesaic.moe.experts): a square shape cannot hide a transpose.
EXPERT_LAYOUT = "w_up_EHD:E,out,in;w_down_EDF:E,out,in"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(out_dir: str | Path, step: int, *, config_yaml: str, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any] | None = None, trainer_state: dict[str, Any] | None = None,
                    rng_state: dict[str, Any] | None = None, tokenizer_json: str | None = None,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``OUT/step-N`` atomically and point ``OUT/LATEST`` at it. Returns the directory. A write that
    fails (disk full, read-only folder) raises :class:`OutputWriteError` naming the folder; the unfinished
    ``.step-N.tmp`` is removed as far as possible and what was published before is untouched."""
    out = Path(out_dir)
    tmp = out / f".{step_dir_name(step)}.tmp"
    try:
        return _save(out, step, config_yaml, model_state, optimizer_state, trainer_state, rng_state,
                     tokenizer_json, extra_files)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            (out / ".LATEST.tmp").unlink(missing_ok=True)
        raise OutputWriteError(f"cannot write checkpoint {step_dir_name(step)} to {out}: "
                               f"{e.strerror or e}") from None


def _save(out: Path, step: int, config_yaml: str, model_state: dict[str, torch.Tensor],
          optimizer_state: dict[str, Any] | None, trainer_state: dict[str, Any] | None,
          rng_state: dict[str, Any] | None, tokenizer_json: str | None,
          extra_files: dict[str, bytes] | None) -> Path:
    final = out / step_dir_name(step)
    tmp = out / f".{step_dir_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    streamed = any(isinstance(v, LazyTensor) for v in model_state.values())
    files: dict[str, bytes] = {"config.yaml": config_yaml.encode()}
    if not streamed:
        files["model.safetensors"] = st_save(model_state)
    if optimizer_state is not None:
        buf = io.BytesIO()
        torch.save(optimizer_state, buf)
        files["optimizer.pt"] = buf.getvalue()
    if trainer_state is not None:
        files["trainer_state.json"] = json.dumps(trainer_state, indent=1, sort_keys=True).encode()
    if rng_state is not None:
        buf = io.BytesIO()
        torch.save(rng_state, buf)
        files["rng.pt"] = buf.getvalue()
    if tokenizer_json is not None:
        files["tokenizer.json"] = tokenizer_json.encode()
    files.update(extra_files or {})
    for name, data in files.items():
        with open(tmp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    listed = {n: {"size": len(d), "sha256": _sha256(d)} for n, d in files.items()}
    if streamed:  # one tensor at a time (a converted model larger than memory; train/stream_safetensors.py)
        with open(tmp / "model.safetensors", "wb") as f:
            write_lazy(f, {n: v if isinstance(v, LazyTensor) else lazy(v) for n, v in model_state.items()})
            f.flush()
            os.fsync(f.fileno())
        size, sha = file_digest(tmp / "model.safetensors")
        listed["model.safetensors"] = {"size": size, "sha256": sha}
    fault_point("checkpoint.after_files", step=step)
    body = {"format": FORMAT, "step": step, "complete": True, "expert_weight_layout": EXPERT_LAYOUT,
            "files": dict(sorted(listed.items())),
            "num_tensors": len(model_state)}
    manifest = dict(body, manifest_sha256=_sha256(_canonical(body)))
    with open(tmp / MANIFEST, "wb") as f:
        f.write(_canonical(manifest))
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    fault_point("checkpoint.before_publish", step=step)
    if final.exists():  # a re-save of the same step (e.g. after resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(out)
    fault_point("checkpoint.after_publish", step=step)
    latest_tmp = out / ".LATEST.tmp"
    with open(latest_tmp, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest_tmp, out / "LATEST")
    _fsync_dir(out)
    return final


def read_manifest(ckpt: str | Path) -> dict[str, Any]:
    """Parse and check ``manifest.json`` and every file it lists; raises a typed error on any defect."""
    d = Path(ckpt)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint not found: {d}")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise CheckpointCorruptError(f"{d}: no {MANIFEST} (not a moesaic checkpoint, or an unfinished save)")
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointCorruptError(f"{mpath}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or _canonical(manifest) != raw:
        raise CheckpointCorruptError(f"{mpath}: manifest is not in canonical form (edited or garbled)")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if manifest.get("manifest_sha256") != _sha256(_canonical(body)):
        raise CheckpointCorruptError(f"{mpath}: manifest hash mismatch (garbled manifest)")
    if manifest.get("format") != FORMAT or manifest.get("complete") is not True:
        raise CheckpointCorruptError(f"{mpath}: unknown format or missing commit marker")
    if manifest.get("expert_weight_layout") != EXPERT_LAYOUT:
        raise CheckpointMismatchError(f"{mpath}: expert weight layout {manifest.get('expert_weight_layout')!r}, "
                                      f"expected {EXPERT_LAYOUT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointCorruptError(f"{mpath}: no file list")
    for name in REQUIRED:
        if name not in files:
            raise CheckpointCorruptError(f"{mpath}: {name} is not listed")
    for name, meta in files.items():
        p = d / name
        if "/" in name or not p.is_file():
            raise CheckpointCorruptError(f"{d}: missing file {name}")
        size, sha = file_digest(p)  # in chunks: a converted model may be larger than memory
        if size != meta.get("size"):
            raise CheckpointCorruptError(f"{p}: size {size} != {meta.get('size')} (truncated or extended)")
        if sha != meta.get("sha256"):
            raise CheckpointCorruptError(f"{p}: sha256 mismatch (corrupt or swapped file)")
    return manifest


def _read(d: Path, name: str) -> bytes:
    return (d / name).read_bytes()


def load_files(ckpt: str | Path, training: bool = False, weights: bool = True) -> dict[str, Any]:
    """Verify and read a checkpoint: ``config_yaml``, ``model_state`` (not with ``weights=False``: the
    streamed reader opens the file itself, :mod:`moesaic.train.lazy_load`), and with ``training`` the
    optimizer, trainer and RNG state."""
    d = resolve(ckpt)
    manifest = read_manifest(d)
    out: dict[str, Any] = {"dir": d, "manifest": manifest, "step": manifest["step"],
                           "config_yaml": _read(d, "config.yaml").decode("utf-8", errors="replace")}
    try:
        if weights:
            out["model_state"] = st_load(_read(d, "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - a hash-valid but unparsable file (hand-made manifest)
        raise CheckpointCorruptError(f"{d}/model.safetensors: unreadable ({e})") from None
    if "tokenizer.json" in manifest["files"]:
        out["tokenizer_json"] = _read(d, "tokenizer.json").decode()
    if training:
        for name in TRAINING:
            if name not in manifest["files"]:
                raise CheckpointCorruptError(f"{d}: {name} is not listed (not a training checkpoint)")
        try:
            out["optimizer_state"] = torch.load(io.BytesIO(_read(d, "optimizer.pt")), weights_only=True)
            out["rng_state"] = torch.load(io.BytesIO(_read(d, "rng.pt")), weights_only=True)
            out["trainer_state"] = json.loads(_read(d, "trainer_state.json"))
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorruptError(f"{d}: unreadable training state ({e})") from None
    return out


def resolve(path: str | Path) -> Path:
    """A step directory, or a run directory whose ``LATEST`` names one."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if (p / MANIFEST).exists() or not (p / "LATEST").exists():
        return p
    name = (p / "LATEST").read_text().strip()
    if not name or "/" in name:
        raise CheckpointCorruptError(f"{p}/LATEST: garbled ({name!r})")
    return p / name


def list_steps(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Published step directories, newest first."""
    out = []
    for p in Path(out_dir).glob("step-*"):
        try:
            out.append((int(p.name.split("-", 1)[1]), p))
        except ValueError:
            continue
    return sorted(out, reverse=True)


def latest_valid(out_dir: str | Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint that passes :func:`read_manifest`; invalid ones are skipped with a warning."""
    warn = warn or (lambda m: warnings.warn(m, stacklevel=2))
    for _, p in list_steps(out_dir):
        try:
            read_manifest(p)
            return p
        except CheckpointError as e:
            warn(f"skipping invalid checkpoint {p.name}: {e}")
    return None


def prune(out_dir: str | Path, keep_last: int, newest_valid: Path) -> list[Path]:
    """Delete published checkpoints beyond the newest ``keep_last``, never ``newest_valid``; only ever
    directories older than it. Unfinished ``.step-*.tmp`` directories are removed too."""
    removed = []
    steps = list_steps(out_dir)
    newest = int(newest_valid.name.split("-", 1)[1])
    older = [(s, p) for s, p in steps if s < newest]
    for _, p in older[max(0, keep_last - 1):]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for p in Path(out_dir).glob(".step-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    return removed


def check_model_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Every target tensor written exactly once with the right shape and dtype (tied copies excepted)."""
    target = model.state_dict()
    tied = {n for n, t in target.items() if n not in unique_state_names(model)}
    missing = [n for n in target if n not in state and n not in tied]
    unexpected = [n for n in state if n not in target]
    if missing or unexpected:
        raise CheckpointMismatchError(f"{where}: parameters do not match the model: missing {missing[:5]}"
                                      f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    for n, t in state.items():
        if tuple(t.shape) != tuple(target[n].shape):
            raise CheckpointMismatchError(f"{where}: {n} has shape {tuple(t.shape)}, the model expects "
                                          f"{tuple(target[n].shape)}")


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], where: str = "checkpoint",
                     scatter: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None) -> None:
    """Check names and shapes, then copy (dtype converted to the model's). ``scatter`` replaces the copy for
    sharded models (each rank takes its experts' slices of the global tensors; it checks the global names
    and shapes itself, since the local expert tensors are slices)."""
    if scatter is not None:
        scatter(model, state)
        return
    check_model_state(model, state, where)
    target = model.state_dict()
    with torch.no_grad():
        for n, t in state.items():
            target[n].copy_(t.to(target[n].dtype))


def load_model(checkpoint_dir: str | Path, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> nn.Module:
    """``moesaic.load(dir)``: build the model from ``config.yaml`` and load ``model.safetensors`` (hashes
    checked). Returns the model in eval mode; ``model.tokenizer`` holds the tokenizer when saved and
    ``model.label_names`` a classifier's class names (from its dataset; None otherwise)."""
    files = load_files(checkpoint_dir)
    cfg = run_config_of(files)
    model = cfg.model.build()
    first = next(iter(files["model_state"].values()), None)
    want = dtype or (first.dtype if first is not None and first.is_floating_point() else None)
    if want is not None:
        model.to(dtype=want)
    load_model_state(model, files["model_state"], str(files["dir"]))
    if device is not None:
        model.to(device)
    attach_files(model, cfg, files)
    return model


def run_config_of(files: dict[str, Any]) -> Any:
    """The run config of checkpoint files read by :func:`load_files`."""
    from moesaic.core.config import loads_yaml
    from moesaic.core.errors import ConfigError
    from moesaic.train.run_config import load_run_config

    try:
        return load_run_config(data=loads_yaml(files["config_yaml"], "config.yaml") or {})
    except ConfigError as e:
        raise CheckpointMismatchError(f"{files['dir']}/config.yaml does not fit this moesaic: {e}") from None


def attach_files(model: Any, cfg: Any, files: dict[str, Any]) -> None:
    """Eval mode, ``run_config``, ``label_names`` (a classifier's class names, from its dataset) and
    ``tokenizer`` (None when the checkpoint has none) on a loaded model."""
    from moesaic.train.datasets.base import DATASETS
    from moesaic.train.tokenizer import TextTokenizer

    model.eval()
    model.run_config = cfg
    data_cls = DATASETS.get(cfg.data.kind) if cfg.data.kind in DATASETS else None
    model.label_names = getattr(data_cls, "label_names", None)
    model.tokenizer = None
    if "tokenizer_json" in files:
        try:
            model.tokenizer = TextTokenizer.from_json(files["tokenizer_json"])
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorruptError(f"{files['dir']}/tokenizer.json: unreadable ({e})") from None
