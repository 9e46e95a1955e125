"""The router interface: score tokens, pick experts, return a :class:`~moesaic.core.types.RoutingDecision`.

A router owns its aux losses (named statistics whose values are the unweighted losses,
:mod:`moesaic.moe.routing.aux_stats`; coefficients in its config) and any balancing state (aux-loss-free
bias, schedules). Padding is handled here once for every router: only valid rows reach
:meth:`Router.route`, so padding never touches a statistic or a capacity slot.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from moesaic.core.config import ComponentConfig, LayerShape, require, rule
from moesaic.core.errors import CausalityError, NonFiniteInputError
from moesaic.core.registry import Registry
from moesaic.core.types import RoutingDecision

ROUTERS: Registry[type[Router]] = Registry(
    "router", "moesaic.moe.routing", base="moesaic.moe.routing.base:Router", default="topk")


@dataclasses.dataclass
class RouterConfig(ComponentConfig):
    """Fields every router has. ``aux_loss_coef`` weighs the router's balance loss, ``z_loss_coef``
    the ST-MoE router z-loss; a coefficient of 0 skips the loss (exactly zero gradient)."""

    registry = ROUTERS
    aux_loss_coef: float = rule(0.0, ge=0.0)
    z_loss_coef: float = rule(0.0, ge=0.0)
    init_std: float = rule(0.02, ge=0.0)

    def validate_moe(self, path: str, layer: LayerShape) -> None:
        """Rules that involve the layer's routed expert count and k. Override and call super()."""
        num_experts, top_k = layer.routed_experts, layer.routed_top_k
        k_path = path.rsplit(".", 1)[0] + ".top_k"
        require(1 <= top_k <= num_experts, k_path, top_k, f"must be in [1, num_experts] = [1, {num_experts}]")
        fixed = ROUTERS.get(self.kind).required_top_k
        if fixed is not None:
            require(top_k == fixed, k_path, top_k,
                    f"router {self.kind!r} routes exactly top-{fixed}; set top_k: {fixed}")


#: Up to this many scores :func:`stable_topk` sorts directly (one op; decode-sized inputs).
SORT_NUMEL = 1024


def stable_topk(scores_TE: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k along the last dim with ties broken by the lower index, so routing is reproducible across
    devices and the contract tests can state exact expected choices.

    On CPU (where the checks below cost no device sync):

    * ``k <= 4``: ``k`` rounds of ``max`` (which returns the first of equal maxima), each masking its pick
      with ``-inf``: exactly the stable order, and 1.2-1.8x faster than the ``torch.topk`` path below for
      router shapes (2048 x 32, k = 4: 0.99 vs 1.22 ms; 2048 x 16, k = 2: 0.39 vs 0.69 ms; 1 thread). A pick
      that is NaN or ``-inf`` (where a masked entry could be picked again) falls back to the stable sort.
    * larger ``k``: ``torch.topk`` (about 2.5x faster than a full stable sort) orders equal values
      arbitrarily, so it is used when the best ``k + 1`` values hold no tie (then selection and order are
      unique).

    Otherwise, on other devices, and for small inputs (at most :data:`SORT_NUMEL` scores: decoding, where
    one sort call is 2-4x faster than the checks above: 5 against 17 us for 1 x 8, k = 2), a stable sort
    decides.
    """
    if scores_TE.numel() <= SORT_NUMEL:  # decoding: one sort, decided before any other check
        srt_v, srt_i = torch.sort(scores_TE, dim=-1, descending=True, stable=True)
        return srt_v[..., :k], srt_i[..., :k]
    E = scores_TE.shape[-1]
    if scores_TE.device.type == "cpu" and 0 < k < E:
        if k <= 4:
            work = scores_TE.detach().clone()
            maxes: list[Tensor] = []
            picks: list[Tensor] = []
            for _ in range(k):
                v, i = work.max(-1, keepdim=True)
                work.scatter_(-1, i, float("-inf"))
                maxes.append(v)
                picks.append(i)
            v_TK, i_TK = torch.cat(maxes, -1), torch.cat(picks, -1)
            if not bool(v_TK.isnan().any() or v_TK.isneginf().any()):
                return (scores_TE.gather(-1, i_TK) if scores_TE.requires_grad else v_TK), i_TK
        else:
            top_v, top_i = torch.topk(scores_TE, k + 1, dim=-1)
            if not bool((top_v[..., 1:] == top_v[..., :-1]).any() or top_v.isnan().any()):
                return top_v[..., :k], top_i[..., :k]
    srt_v, srt_i = torch.sort(scores_TE, dim=-1, descending=True, stable=True)
    return srt_v[..., :k], srt_i[..., :k]


def check_finite(x_VD: Tensor, layer_name: str) -> None:
    """Raise :class:`NonFiniteInputError` naming the layer when a routed row holds NaN or inf.

    A finite sum proves every entry finite (NaN and inf propagate through a sum), so only a non-finite sum
    (or an overflow) pays for the elementwise check.
    """
    if not math.isfinite(x_VD.sum().item()) and not torch.isfinite(x_VD).all():
        raise NonFiniteInputError(
            f"{layer_name}: router input holds NaN or inf "
            f"({int((~torch.isfinite(x_VD)).any(-1).sum())} of {x_VD.shape[0]} valid tokens)")


def router_dtype(x: Tensor) -> torch.dtype:
    """Routers run in fp32, or fp64 when the input is fp64 (exactness tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Router(nn.Module):
    """Base class. Subclasses implement :meth:`route` on valid tokens only."""

    Config: ClassVar[type[RouterConfig]] = RouterConfig
    #: False for routers that look at every token of the group (expert choice, Soft MoE).
    causal_ok: ClassVar[bool] = True
    #: False for routers without trainable scoring weights (hash, random partition, THOR).
    has_weight: ClassVar[bool] = True
    #: Appended to the CausalityError message (e.g. how to opt into a fallback).
    causal_hint: ClassVar[str] = ""
    #: Set by routers defined for one k only (Switch: 1, GShard: 2); the config check enforces it.
    required_top_k: ClassVar[int | None] = None
    #: Dispatcher kind this router's decisions need (Soft MoE's slot mixing); None = any COO dispatcher.
    requires_dispatcher: ClassVar[str | None] = None
    #: True for routers whose eval-mode routing is random by design (THOR); reproducible under a seed.
    stochastic_eval: ClassVar[bool] = False

    @classmethod
    def causal_allowed(cls, cfg: RouterConfig) -> bool:
        """Whether this router may be built with ``causal=True``; override for an opt-in fallback."""
        return cls.causal_ok

    @classmethod
    def example_ctx(cls, num_tokens: int, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Extra routing inputs a test needs to call this router on ``num_tokens`` tokens.

        The contract tests (``tests/moe/routing/test_contract.py``) call every registered router with
        ``**Router.example_ctx(T)``. Routers that need context (``token_ids`` for hash routing, ``task_id``
        for task routing) override this; tensors whose first dim is ``num_tokens`` are per-token and are
        sliced together with the tokens, anything else is passed as is. Default: no context.
        """
        return {}

    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int, top_k: int, *, causal: bool = False):
        super().__init__()
        if causal and not self.causal_allowed(cfg):
            raise CausalityError(
                f"router {cfg.kind!r} selects tokens using the whole group, including future positions; "
                f"it cannot be used in a causal (autoregressive) model{self.causal_hint}")
        self.cfg, self.d_model, self.num_experts, self.top_k, self.causal = cfg, d_model, num_experts, top_k, causal
        self.layer_name = "moe"
        if self.has_weight:
            self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # [E, D], like nn.Linear / HF gate
            self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.has_weight:
            nn.init.normal_(self.weight, std=self.cfg.init_std)

    # -------------------------------------------------------------------------------- public API
    def forward(self, x_TD: Tensor, mask_T: Tensor | None = None, **ctx: Any) -> RoutingDecision:
        T = x_TD.shape[0]
        rows_V = None if mask_T is None or bool(mask_T.all()) else mask_T.reshape(-1).nonzero().squeeze(1)
        x_VD = x_TD if rows_V is None else x_TD[rows_V]
        check_finite(x_VD, self.layer_name)  # padding may hold anything, NaN included
        if rows_V is None:
            return self.route(x_TD, **ctx)  # num_valid_tokens None: every token was routed
        sub = {k: (v[rows_V] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == T else v)
               for k, v in ctx.items()}
        return self.route(x_VD, **sub).expand_tokens(rows_V, T)

    def route(self, x_TD: Tensor, **ctx: Any) -> RoutingDecision:
        raise NotImplementedError  # abstract: every registered router implements it

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits ``[T, E]`` computed in fp32 (fp64 for fp64 input), outside autocast."""
        w = self.weight
        if x_TD.dtype is w.dtype is torch.float32 and not torch.is_autocast_enabled(x_TD.device.type):
            return nn.functional.linear(x_TD, w)  # as it is (no cast calls: decoding)
        dt = router_dtype(x_TD)
        if not torch.is_autocast_enabled(x_TD.device.type):  # entering the context costs more than the matmul
            if x_TD.dtype == dt == w.dtype:
                return nn.functional.linear(x_TD, w)
            return nn.functional.linear(x_TD.to(dt), w.to(dt))
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return nn.functional.linear(x_TD.to(dt), self.weight.to(dt))

    def loss_coefs(self) -> dict[str, float]:
        """Coefficient per aux-loss name; names absent here are reported but not added to the loss."""
        return {"balance": self.cfg.aux_loss_coef, "z": self.cfg.z_loss_coef}

    def needs_batch_totals(self) -> bool:
        """Whether exact aux losses of a split batch (micro-batches, ranks) need the batch totals of this
        router's statistics, i.e. a no-grad pre-pass or an all-reduce (docs/design.md, Balance statistics).

        True when a loss other than the z-loss has a non-zero coefficient. The z-loss is a token mean, whose
        share of a split batch is its local value times the part's token fraction without any totals; every
        other loss, a new router's included, takes the exact path without declaring anything.
        """
        return any(c > 0 for n, c in self.loss_coefs().items() if n != "z")

    def uses_seq_ids(self) -> bool:
        """Whether :meth:`route` reads ``seq_ids_T`` (the sequence of every token, which the layer builds for a
        ``[B, S, D]`` input). True unless a router says otherwise; a router that never reads it saves two ops
        per call (decoding)."""
        return True

    def on_optimizer_step(self, step: int) -> None:
        """Called once after every optimizer step with the new global step (balancing, schedules)."""

    def extra_repr(self) -> str:
        return f"kind={self.cfg.kind}, d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}"
