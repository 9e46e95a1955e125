"""Task-level sparsity for M3ViT task gates: single-task inference keeps only that task's experts (Liang et
al. 2022, "M3ViT: Mixture-of-Experts Vision Transformer for Efficient Multi-task Learning with
Model-Accelerator Co-design"; Sarkar et al. 2023, "Edge-MoE", which runs that pruned path on an FPGA).

:func:`prune_to_task` returns a copy of a ``task_gates`` MoE layer that holds only the experts one task
uses, plus that task's gate (all its logits, so the softmax weights are unchanged). For inputs whose
selections stay inside the kept set its output equals the full layer's for that task exactly; a
selection outside the set raises :class:`~moesaic.core.errors.RoutingInputError` instead of silently
changing the result. With a hard partition (``experts_per_task``) the kept set is the task's window and
covers every input; otherwise collect it from calibration data with :func:`used_experts`.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from moesaic.core.errors import RoutingInputError
from moesaic.core.types import RoutingDecision
from moesaic.moe.routing.task import TaskGatesRouter

if TYPE_CHECKING:  # runtime import would be circular (the router registry imports this module)
    from moesaic.moe.layer import MoELayer


class TaskPrunedRouter(nn.Module):
    """One task's gate of a :class:`TaskGatesRouter`, with expert ids mapped to the kept experts."""

    local_E: Tensor

    def __init__(self, router: TaskGatesRouter, task: int, keep_E: list[int]):
        super().__init__()
        self.router, self.task = router, task
        self.keep = list(keep_E)
        local = torch.full((router.num_experts,), -1, dtype=torch.long)
        local[torch.tensor(self.keep, dtype=torch.long)] = torch.arange(len(self.keep))
        self.register_buffer("local_E", local, persistent=False)

    @property
    def layer_name(self) -> str:
        return self.router.layer_name

    @layer_name.setter
    def layer_name(self, name: str) -> None:
        self.router.layer_name = name

    def loss_coefs(self) -> dict[str, float]:
        return self.router.loss_coefs()

    def uses_seq_ids(self) -> bool:
        return self.router.uses_seq_ids()

    def forward(self, x_TD: Tensor, mask_T: Tensor | None = None, **ctx: Any) -> RoutingDecision:
        ctx["task_id"] = self.task
        d = self.router(x_TD, mask_T, **ctx)
        local_N = self.local_E.to(d.expert_idx_N.device)[d.expert_idx_N]
        if bool((local_N < 0).any()):
            missing = sorted(set(d.expert_idx_N[local_N < 0].tolist()))
            raise RoutingInputError(f"{self.layer_name}: task {self.task} selected experts {missing}, which this "
                                    f"task-pruned layer does not hold (kept: {self.keep})")
        return d.replace(expert_idx_N=local_N, num_experts=len(self.keep))


@torch.no_grad()
def used_experts(layer: MoELayer, x: Tensor, task_id: int, mask: Tensor | None = None) -> list[int]:
    """Experts that ``layer`` selects for task ``task_id`` on calibration input ``x`` (eval mode)."""
    was = layer.training
    layer.eval()
    try:
        x_TD = x.reshape(-1, layer.d_model)
        ctx: dict[str, Any] = {"task_id": task_id}
        if x.dim() == 3:
            ctx["seq_ids_T"] = torch.arange(x.shape[0], device=x.device).repeat_interleave(x.shape[1])
        d = layer.router(x_TD, None if mask is None else mask.reshape(-1).bool(), **ctx)
    finally:
        layer.train(was)
    return sorted(set(d.expert_idx_N.tolist()))


def prune_to_task(layer: MoELayer, task_id: int, experts: list[int] | None = None) -> MoELayer:
    """A copy of ``layer`` that materialises only ``experts`` (default: the task's hard window) for one task."""
    router = layer.router
    if not isinstance(router, TaskGatesRouter):
        raise TypeError(f"{layer.layer_name}: prune_to_task needs a task_gates router, not {type(router).__name__}")
    if experts is None:
        if router.cfg.experts_per_task is None:
            raise RoutingInputError(f"{layer.layer_name}: no hard partition (experts_per_task); pass the experts "
                                    "the task uses, e.g. used_experts(layer, calibration_x, task_id)")
        experts = list(range(*router.window(task_id)))
    keep = sorted(set(int(e) for e in experts))
    pruned = copy.copy(layer)  # shallow: new module dicts below, shared config
    pruned._modules = dict(layer._modules)
    pruned._parameters, pruned._buffers = dict(layer._parameters), dict(layer._buffers)
    task_router = copy.deepcopy(router)
    local_task = task_id
    if router.cfg.conditioning == "multi_gate":
        # Keep only this task's gate, as task 0 of the copy; its window stays the original task's window.
        with torch.no_grad():
            task_router.weight_XED = nn.Parameter(router.weight_XED[task_id:task_id + 1].clone())
        start, end = router.window(task_id)

        def fixed_window(_task: int, _s: int = start, _e: int = end) -> tuple[int, int]:
            return _s, _e

        # The copy's only gate keeps the original task's expert window (an instance override on purpose).
        task_router.window = fixed_window  # type: ignore[method-assign,assignment]
        local_task = 0
    pruned.router = TaskPrunedRouter(task_router, local_task, keep)
    experts_mod = layer.cfg.experts.build(layer.d_model, layer.experts.d_ff, len(keep))
    experts_mod.to(dtype=next(layer.experts.parameters()).dtype)
    for i, e in enumerate(keep):
        experts_mod.load_expert_state(i, {k: v.detach() for k, v in layer.experts.expert_state(e).items()})
    ref = next(layer.experts.parameters())
    experts_mod.to(device=ref.device, dtype=ref.dtype)
    pruned.experts = experts_mod
    pruned.num_experts = len(keep)
    return pruned


def prune_model_to_task(model: nn.Module, task_id: int) -> nn.Module:
    """A copy of ``model`` for single-task inference: every ``task_gates`` MoE layer replaced by
    :func:`prune_to_task` (needs ``experts_per_task``, so the kept window covers every input); other modules
    are copied unchanged. Its outputs for ``task_id`` equal the full model's bitwise (the same gate logits
    and the same expert weights, in the same order)."""
    from moesaic.moe.layer import MoELayer

    pruned = copy.deepcopy(model)
    for name, mod in list(pruned.named_modules()):
        if isinstance(mod, MoELayer) and isinstance(mod.router, TaskGatesRouter):
            parent, _, leaf = name.rpartition(".")
            setattr(pruned.get_submodule(parent) if parent else pruned, leaf, prune_to_task(mod, task_id))
    return pruned
