"""Checkpoints of expert-parallel models with *global* expert keys (docs/parallel.md, "Checkpoints with
global expert keys").

A checkpoint never depends on the EP size it was written at: each stacked expert tensor is saved under
its one-process name with all ``E`` experts (``[E, ...]``), gathered over the expert-parallel group; a
rank loading at any EP size takes its slice ``[offset, offset + E_local)``. Optimizer moments of expert
parameters (same shapes) are gathered and sliced the same way. ``experts.json`` (listed and hashed in the
manifest) names every expert of every layer exactly once with the sha256 of its tensors.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moesaic.core.errors import CheckpointMismatchError
from moesaic.distributed.expert_parallel import ExpertShard
from moesaic.distributed.groups import group_size
from moesaic.moe.api import moe_layers


def expert_tensors(model: nn.Module) -> dict[str, tuple[nn.Parameter, ExpertShard, dist.ProcessGroup | None]]:
    """Global name -> (local parameter, shard info, EP group) for every sharded stacked expert tensor."""
    out = {}
    prefix = {id(m): n for n, m in model.named_modules()}
    for layer in moe_layers(model):
        shard = getattr(layer.experts, "ep_shard", None)
        if shard is None:
            continue
        group = layer.experts.group
        for n in layer.experts.stacked_names():
            name = f"{prefix[id(layer.experts)]}.{n}"
            out[name] = (getattr(layer.experts, n), shard, group)
    return out


def _gather0(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    W = group_size(group)
    if W == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(W)]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, 0)


def unique_state_names(model: nn.Module) -> set[str]:
    """State-dict names with tied tensors once (the first name)."""
    seen, names = set(), set()
    for name, t in model.state_dict().items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            continue
        seen.add(ptr)
        names.add(name)
    return names


def local_model_state(model: nn.Module) -> dict[str, Tensor]:
    """This process's state of the model on the CPU, tied tensors once (the first name)."""
    keep = unique_state_names(model)
    return {n: t.detach().to("cpu").contiguous() for n, t in model.state_dict().items() if n in keep}


def gather_model_state(model: nn.Module) -> dict[str, Tensor]:
    """Global model state (collective over every EP group): expert tensors with all E experts. Without
    sharded experts it is :func:`local_model_state`."""
    state = local_model_state(model)
    for name, (p, _shard, group) in expert_tensors(model).items():
        state[name] = _gather0(p, group).cpu()
    return state


def scatter_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a global state into a (possibly sharded) model: check global names and shapes, then copy each
    rank's expert slice and every other tensor."""
    experts = expert_tensors(model)
    target = model.state_dict()
    keep = unique_state_names(model)
    missing = [n for n in keep if n not in state]
    unexpected = [n for n in state if n not in target]
    if missing or unexpected:
        raise CheckpointMismatchError(f"parameters do not match the model: missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for n, t in state.items():
            if n in experts:
                p, shard, _ = experts[n]
                want = (shard.num_global,) + tuple(p.shape[1:])
                if tuple(t.shape) != want:
                    raise CheckpointMismatchError(f"{n} has shape {tuple(t.shape)}, the model expects {want}")
                p.copy_(t[shard.offset:shard.offset + shard.num_local].to(p.dtype))
            else:
                if tuple(t.shape) != tuple(target[n].shape):
                    raise CheckpointMismatchError(f"{n} has shape {tuple(t.shape)}, the model expects "
                                                  f"{tuple(target[n].shape)}")
                target[n].copy_(t.to(target[n].dtype))


def _param_index(opt: torch.optim.Optimizer) -> dict[int, int]:
    ids, i = {}, 0
    for g in opt.param_groups:
        for p in g["params"]:
            ids[id(p)] = i
            i += 1
    return ids


def gather_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state with expert moments gathered to all E experts (collective)."""
    idx = _param_index(opt)
    st = dict(state["state"])
    for _name, (p, shard, group) in expert_tensors(model).items():
        i = idx[id(p)]
        if i in st:
            st[i] = {k: (_gather0(v, group) if torch.is_tensor(v) and v.dim() and v.shape[0] == shard.num_local
                         else v) for k, v in st[i].items()}
    return {**state, "state": st}


def scatter_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """Slice the global expert moments of a checkpoint's optimizer state for this rank."""
    idx = _param_index(opt)
    st = dict(state["state"])
    for name, (p, shard, _group) in expert_tensors(model).items():
        i = idx[id(p)]
        if i in st:
            new = {}
            for k, v in st[i].items():
                if torch.is_tensor(v) and v.dim() and tuple(v.shape[1:]) == tuple(p.shape[1:]):
                    if v.shape[0] != shard.num_global:
                        raise CheckpointMismatchError(f"optimizer state {k} of {name}: {v.shape[0]} experts, "
                                                      f"expected {shard.num_global}")
                    v = v[shard.offset:shard.offset + shard.num_local].clone()
                new[k] = v
            st[i] = new
    return {**state, "state": st}


def experts_manifest(model: nn.Module, state: dict[str, Tensor]) -> bytes:
    """``experts.json``: for every stacked expert tensor, its expert count and one sha256 per expert."""
    names = {}
    for layer in moe_layers(model):
        prefix = next(n for n, m in model.named_modules() if m is layer.experts)
        for n in layer.experts.stacked_names():
            names[f"{prefix}.{n}"] = layer.num_experts
    body = {}
    for n, E in sorted(names.items()):
        t = state[n]
        body[n] = {"num_experts": E, "experts": list(range(t.shape[0])),
                   "sha256": [hashlib.sha256(t[e].contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                              for e in range(t.shape[0])]}
    return json.dumps(body, indent=1, sort_keys=True).encode()
