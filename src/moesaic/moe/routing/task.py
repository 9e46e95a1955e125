"""Task- and domain-conditioned routing.

* ``task_gates`` - M3ViT (Liang et al. 2022, "M3ViT: Mixture-of-Experts Vision Transformer for Efficient
  Multi-task Learning", VITA-Group/M3ViT ``models/custom_moe_layer.py``, ``gate_funs/noisy_gate_vmoe.py``):
  one gate per task (``multi_gate``), chosen by the ``task_id`` context (an int, or one id per sequence
  ``[B]`` / per token ``[T]``); the experts are shared. The gate is the V-MoE noisy gate
  ``softmax((z + N(0, (noise_std / E)^2)) / temperature)`` (noise only in training), top-k, raw weights
  (variant A). Optional hard partition (``experts_per_task``, ``regu_experts_fromtask``): task t may only
  use the window ``[start_t, start_t + n)`` with ``start_t = int(t * (E - n) / (num_tasks - 1))``.
  :func:`moesaic.transforms.task_prune.prune_to_task` builds a layer holding only one task's experts
  (Edge-MoE task-level sparsity). The default balance loss is the Switch loss, so that its coefficient
  means what it means for every other router (1 at uniform routing); ``balance_loss: cv2`` gives the
  code's CV² of importance (gate values summed per expert) plus CV² of the load (0 at uniform).
  ``conditioning: concat`` is M3ViT's option (b): one gate on ``[x ; phi(onehot(task))]`` with ``phi`` an
  MLP from ``num_tasks`` to ``task_dim``; we use Linear-GELU-Linear and have not compared it with the
  shape of the code's ``new_Mlp``.
* ``domain`` - domain-enforced routing (Hallee et al. 2024, "Contrastive Learning and Mixture of Experts
  Enables Precise Vector Embeddings"): every token of a sequence from domain d goes to expert d with
  weight 1, from the ``domain_id`` context. No router parameter, so throughput equals the dense model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor, nn

from moesaic.core.config import LayerShape, require, rule
from moesaic.core.errors import RoutingInputError
from moesaic.core.types import RoutingDecision
from moesaic.moe.routing import losses
from moesaic.moe.routing.aux_stats import AuxStat, Sum
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig, router_dtype, stable_topk


def per_token(name: str, value: Any, T: int, seq_ids_T: Tensor | None, device: torch.device, layer: str) -> Tensor:
    """A context value as one int64 per token: an int, ``[T]`` (per token) or one per sequence."""
    if value is None:
        raise RoutingInputError(f"{layer}: this router needs {name} (an int, or a tensor with one id per "
                                "sequence or per token) passed to the MoE layer as a keyword")
    if isinstance(value, int):
        return torch.full((T,), value, dtype=torch.long, device=device)
    v = torch.as_tensor(value, device=device).long().reshape(-1)
    if v.numel() == 1:
        return v.expand(T)
    if v.numel() == T:
        return v
    if seq_ids_T is None:
        raise RoutingInputError(f"{layer}: {name} has {v.numel()} entries for {T} tokens and no sequence ids; "
                                "pass one per token, or [B, S, D] input with one per sequence")
    _, seq_T = torch.unique(seq_ids_T.to(device), return_inverse=True)
    if int(seq_T.max()) >= v.numel():
        raise RoutingInputError(f"{layer}: {name} has {v.numel()} entries but the batch holds more sequences")
    return v[seq_T]


def _check_range(name: str, ids_T: Tensor, n: int, layer: str) -> None:
    if ids_T.numel() and (int(ids_T.min()) < 0 or int(ids_T.max()) >= n):
        raise RoutingInputError(f"{layer}: {name} must be in [0, {n}), got {torch.unique(ids_T).tolist()}")


@dataclasses.dataclass
class TaskGatesRouterConfig(RouterConfig):
    """``num_tasks`` gates (``multi_gate``) or one gate on the input concatenated with a ``task_dim`` task
    feature (``concat``); ``noise_std`` (V-MoE, scaled by 1/E) in training; ``experts_per_task`` = the hard
    window size n (None: every task may use every expert)."""

    num_tasks: int = rule(2, ge=1)
    conditioning: Literal["multi_gate", "concat"] = "multi_gate"
    task_dim: int = rule(8, ge=1)
    noise_std: float = rule(1.0, ge=0.0)
    temperature: float = rule(1.0, gt=0.0)
    experts_per_task: int | None = rule(None, ge=1)
    aux_loss_coef: float = rule(0.01, ge=0.0)
    balance_loss: Literal["switch", "cv2"] = "switch"

    def validate_moe(self, path: str, layer: LayerShape) -> None:
        super().validate_moe(path, layer)
        num_experts, top_k = layer.routed_experts, layer.routed_top_k
        if self.experts_per_task is not None:
            require(top_k <= self.experts_per_task <= num_experts, f"{path}.experts_per_task",
                    self.experts_per_task, f"must be in [top_k = {top_k}, num_experts = {num_experts}]")


@ROUTERS.register("task_gates")
class TaskGatesRouter(Router):
    """M3ViT multi-gate: one noisy top-k gate per task over shared experts (Liang et al. 2022)."""

    Config = TaskGatesRouterConfig
    cfg: TaskGatesRouterConfig
    has_weight = False

    def __init__(self, cfg: TaskGatesRouterConfig, d_model: int, num_experts: int, top_k: int, **kw: Any):
        super().__init__(cfg, d_model, num_experts, top_k, **kw)
        if cfg.conditioning == "multi_gate":
            self.weight_XED = nn.Parameter(torch.empty(cfg.num_tasks, num_experts, d_model))  # X = task
            nn.init.normal_(self.weight_XED, std=cfg.init_std)
        else:
            self.task_mlp = nn.Sequential(nn.Linear(cfg.num_tasks, cfg.task_dim), nn.GELU(),
                                          nn.Linear(cfg.task_dim, cfg.task_dim))
            self.weight_EG = nn.Parameter(torch.empty(num_experts, d_model + cfg.task_dim))  # G = D + task_dim
            nn.init.normal_(self.weight_EG, std=cfg.init_std)

    @classmethod
    def example_ctx(cls, num_tokens: int, device: torch.device | str = "cpu") -> dict[str, Any]:
        return {"task_id": 0}

    def window(self, task: int) -> tuple[int, int]:
        """``[start, end)`` of the experts task ``task`` may use (all experts without a hard partition)."""
        n, E, X = self.cfg.experts_per_task, self.num_experts, self.cfg.num_tasks
        if n is None:
            return 0, E
        start = int(task * (E - n) / (X - 1)) if X > 1 else 0
        return start, start + n

    def task_logits(self, x_TD: Tensor, task: int) -> Tensor:
        dt = router_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            if self.cfg.conditioning == "multi_gate":
                z_TE = nn.functional.linear(x_TD.to(dt), self.weight_XED[task].to(dt))
            else:  # [x ; phi(onehot(task))] @ W^T, without materialising the concatenation
                onehot = torch.zeros(self.cfg.num_tasks, device=x_TD.device, dtype=self.weight_EG.dtype)
                onehot[task] = 1.0
                feat = self.task_mlp(onehot)
                w_EG = self.weight_EG.to(dt)
                z_TE = (nn.functional.linear(x_TD.to(dt), w_EG[:, :self.d_model])
                        + nn.functional.linear(feat.to(dt), w_EG[:, self.d_model:]))
        if self.training and self.cfg.noise_std > 0:
            z_TE = z_TE + torch.randn_like(z_TE) * (self.cfg.noise_std / self.num_experts)
        z_TE = z_TE / self.cfg.temperature
        start, end = self.window(task)
        if (start, end) != (0, self.num_experts):
            keep_E = torch.zeros(self.num_experts, dtype=torch.bool, device=x_TD.device)
            keep_E[start:end] = True
            z_TE = z_TE.masked_fill(~keep_E, float("-inf"))
        return z_TE

    def route(self, x_TD: Tensor, task_id: Any = None, seq_ids_T: Tensor | None = None, **ctx: Any) -> RoutingDecision:
        T, E = x_TD.shape[0], self.num_experts
        task_T = per_token("task_id", task_id, T, seq_ids_T, x_TD.device, self.layer_name)
        _check_range("task_id", task_T, self.cfg.num_tasks, self.layer_name)
        logits_TE = x_TD.new_zeros(T, E, dtype=router_dtype(x_TD))
        for task in torch.unique(task_T).tolist():
            rows = (task_T == task).nonzero().squeeze(1)
            logits_TE = logits_TE.index_copy(0, rows, self.task_logits(x_TD[rows], task))
        probs_TE = logits_TE.softmax(-1)
        w_TK, ids_TK = stable_topk(probs_TE, self.top_k)
        stats: dict[str, AuxStat] = {}
        if self.cfg.aux_loss_coef > 0:
            counts_E = torch.bincount(ids_TK.reshape(-1), minlength=E)
            if self.cfg.balance_loss == "switch":
                stats["balance"] = losses.SwitchBalance(probs_TE, counts_E)
            else:  # V-MoE / M3ViT: CV^2 of the importance (summed gates) plus CV^2 of the load (counts)
                imp_E = probs_TE.new_zeros(E).index_add(0, ids_TK.reshape(-1), w_TK.reshape(-1))
                stats["balance"] = Sum(imp=losses.CV2(imp_E), load=losses.CV2(counts_E.to(probs_TE.dtype)))
        if self.cfg.z_loss_coef > 0:
            stats["z"] = losses.z_loss(logits_TE.masked_fill(logits_TE.isinf(), -1e4))
        return RoutingDecision.from_topk(ids_TK, w_TK, E, probs_TE=probs_TE,
                                         logits_TE=logits_TE.masked_fill(logits_TE.isinf(), 0.0), aux_stats=stats)


@dataclasses.dataclass
class DomainRouterConfig(RouterConfig):
    """The layer's ``num_experts`` is the number of domains; ``top_k`` must be 1."""

    aux_loss_coef: float = 0.0


@ROUTERS.register("domain")
class DomainRouter(Router):
    """Domain-enforced routing: every token of a domain-d sequence goes to expert d (Hallee et al. 2024)."""

    Config = DomainRouterConfig
    cfg: DomainRouterConfig
    has_weight = False
    required_top_k = 1

    @classmethod
    def example_ctx(cls, num_tokens: int, device: torch.device | str = "cpu") -> dict[str, Any]:
        return {"domain_id": 0}

    def route(self, x_TD: Tensor, domain_id: Any = None, seq_ids_T: Tensor | None = None,
              **ctx: Any) -> RoutingDecision:
        T = x_TD.shape[0]
        dom_T = per_token("domain_id", domain_id, T, seq_ids_T, x_TD.device, self.layer_name)
        _check_range("domain_id", dom_T, self.num_experts, self.layer_name)
        w_TK = torch.ones(T, 1, dtype=router_dtype(x_TD), device=x_TD.device)
        return RoutingDecision.from_topk(dom_T[:, None].clone(), w_TK, self.num_experts)
