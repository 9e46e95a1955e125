"""Models whose weights stay on disk until they are needed: the skeleton built on the meta device, and
``model.lazy_state`` mapping every saved tensor's name to a :class:`~moesaic.train.stream_safetensors.LazyTensor`
that reads it from its safetensors file (a fresh ``safe_open`` per tensor, so no file stays mapped).

This is what ``moesaic convert upcycle --set stream=true`` reads its inputs with (docs/convert.md,
"Streaming"): a model larger than memory is converted shard by shard, each tensor read when the checkpoint
writer reaches the tensor made from it. :func:`materialise` gives one module (a dense FFN) with real
weights for as long as a producer needs it. Hugging Face folders are read lazily by
``moesaic.interop.hf.from_hf(..., lazy=True)``; moesaic checkpoints by :func:`load_checkpoint_lazily`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from moesaic.core.errors import CheckpointCorruptError, CheckpointMismatchError
from moesaic.train.stream_safetensors import LazyTensor, dtype_of

#: ``model.lazy_state``: state-dict name -> the tensor, made when it is asked for.
LazyState = dict[str, LazyTensor]


def lazy_state(model: nn.Module) -> LazyState:
    """The model's lazy tensors (created empty on first use)."""
    state: LazyState = model.__dict__.setdefault("lazy_state", {})
    return state


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Each state-dict name -> the first name of the same tensor (tied weights: ``lm_head.weight`` ->
    ``embed.weight``). Ties are found by object identity, which meta tensors keep (their addresses are all 0)."""
    first: dict[int, str] = {}
    return {n: first.setdefault(id(t), n) for n, t in model.state_dict(keep_vars=True).items()}


def saved_names(model: nn.Module) -> set[str]:
    """The names a checkpoint stores: tied tensors once (meta-safe :func:`canonical_names`)."""
    return {c for c in canonical_names(model).values()}


def read_tensor(path: str | Path, key: str) -> Tensor:
    """One tensor of a safetensors file, the file opened (memory-mapped) only for this read."""
    with safe_open(str(path), "pt") as f:
        t: Tensor = f.get_tensor(key)
    return t


def value(model: nn.Module, name: str) -> Tensor:
    """The tensor ``name`` of the model's state: made from ``lazy_state`` when registered, else the real one."""
    lazy = getattr(model, "lazy_state", {})
    if name in lazy:
        t: Tensor = lazy[name].make()
        return t
    return model.state_dict()[name].detach()


@torch.no_grad()
def materialise(module: nn.Module, prefix: str, state: LazyState) -> nn.Module:
    """``module`` itself when it holds real tensors; else a CPU copy with every saved tensor made from
    ``state[f"{prefix}.{name}"]`` (non-persistent buffers are left unset)."""
    tensors = module.state_dict(keep_vars=True)
    if not any(t.is_meta for t in tensors.values()):
        return module
    real = copy.deepcopy(module).to_empty(device="cpu")
    for name, t in real.state_dict(keep_vars=True).items():
        t.copy_(state[f"{prefix}.{name}" if prefix else name].make())
    return real


def _file_tensor(path: Path, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> LazyTensor:
    return LazyTensor(shape, dtype, lambda: read_tensor(path, key).to(dtype))


def load_checkpoint_lazily(checkpoint_dir: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """A moesaic checkpoint (hashes checked, in chunks) as a meta model whose ``lazy_state`` reads each tensor
    from ``model.safetensors`` when asked; ``tokenizer``, ``run_config`` and ``label_names`` as
    :func:`moesaic.train.checkpoint.load_model` sets them. The model cannot run; it can be converted and saved."""
    from moesaic.train.checkpoint import attach_files, load_files, run_config_of

    files = load_files(checkpoint_dir, weights=False)
    cfg = run_config_of(files)
    with torch.device("meta"):
        model = cfg.model.build()
    path = Path(files["dir"]) / "model.safetensors"
    try:
        with safe_open(str(path), "pt") as f:
            have = {k: (tuple(f.get_slice(k).get_shape()), dtype_of(f.get_slice(k).get_dtype())) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a hash-valid but unparsable file (hand-made manifest)
        raise CheckpointCorruptError(f"{path}: unreadable ({e})") from None
    first = next(iter(have.values()), None)
    want_dtype = dtype or (first[1] if first is not None and first[1].is_floating_point else None)
    if want_dtype is not None:
        model.to(dtype=want_dtype)
    target = model.state_dict()
    want = saved_names(model)
    missing, unexpected = sorted(want - have.keys()), sorted(have.keys() - target.keys())
    if missing or unexpected:
        raise CheckpointMismatchError(f"{files['dir']}: parameters do not match the model: missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}")
    lazy = lazy_state(model)
    for n in sorted(want):
        t = target[n]
        if have[n][0] != tuple(t.shape):
            raise CheckpointMismatchError(f"{files['dir']}: {n} has shape {have[n][0]}, the model expects "
                                          f"{tuple(t.shape)}")
        lazy[n] = _file_tensor(path, n, t.dtype, tuple(t.shape))
    attach_files(model, cfg, files)
    return model

