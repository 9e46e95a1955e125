"""The MoE layer: router -> dispatch plan -> experts (+ shared experts). Composition only.

``forward(x, mask=None, **ctx)`` takes ``[T, D]`` or ``[B, S, D]`` and returns the same shape, so the
layer drops into any model in place of an FFN. ``mask`` (same leading shape, True = real token) removes
padding from routing, capacity and every statistic; padding rows get output 0. ``ctx`` carries extra
routing inputs (``token_ids`` for hash routing, ``task_id`` for task routing); a tensor in ``ctx`` whose
leading dimensions equal the input's token dimensions (``[B, S, ...]`` for a ``[B, S, D]`` input) is
flattened like the input (to ``[B*S, ...]``), anything else is passed as it is.

After each forward the layer holds ``aux_losses`` (weighted by the router's coefficients; summed over
the model by :func:`moesaic.collect_aux_losses`), ``aux_stats`` (the router's unweighted balance
statistics of this forward, for exact accumulation over micro-batches and ranks) and ``last_stats``
(detached counts for logging). :meth:`MoELayer.register_routing_hook` observes every forward's decision
and plan (docs/design.md, "The data path").
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from moesaic.core.config import Section, require, rule
from moesaic.core.errors import RoutingInputError
from moesaic.core.types import DispatchPlan, RoutingDecision
from moesaic.moe.dense_ffn import DenseFFN
from moesaic.moe.dispatch.base import DispatcherConfig
from moesaic.moe.dispatch.sort import SortDispatcher
from moesaic.moe.experts.backends.active import ExpertViews, token_experts
from moesaic.moe.experts.base import Experts, ExpertsConfig
from moesaic.moe.experts.kernels import StackedFFN
from moesaic.moe.experts.stacked_ffn import FFNExperts
from moesaic.moe.recompute import recomputing
from moesaic.moe.routing.base import ROUTERS, RouterConfig, check_finite
from moesaic.moe.routing.topk import TopKRouter


@dataclasses.dataclass
class SharedExpertsConfig(Section):
    """Always-active experts (DeepSeekMoE shared-expert isolation; Qwen2-MoE's sigmoid-gated expert).

    ``num`` shared experts of width ``d_ff`` (default: the routed expert width) are built as one FFN of
    width ``num * d_ff`` (equal to their sum). ``gate: sigmoid`` scales the output by
    ``sigmoid(x w_g)`` (Qwen2-MoE); ``combine: average`` returns ``(routed + shared) / 2`` (GNT-MOVE).
    ``bias: true`` gives the shared FFN biases (GNT-MOVE's permanent expert is a ReLU MLP with biases).
    """

    num: int = rule(0, ge=0)
    d_ff: int | None = rule(None, ge=1)
    activation: str = "silu"
    gated: bool = True
    gate: Literal["none", "sigmoid"] = "none"
    combine: Literal["sum", "average"] = "sum"
    bias: bool = False


@dataclasses.dataclass
class MoEConfig(Section):
    """One MoE layer. ``num_experts``/``top_k``/``d_ff`` describe the routed experts before fine-grained
    segmentation: ``granularity: m`` builds ``m * num_experts`` experts of width ``d_ff / m`` with
    ``m * top_k`` active (DeepSeekMoE: Dai et al. 2024, fine-grained expert segmentation), keeping FLOPs
    and parameters."""

    d_ff: int = rule(64, ge=1)
    num_experts: int = rule(8, ge=1)
    top_k: int = rule(2, ge=1)
    granularity: int = rule(1, ge=1)
    router: RouterConfig = dataclasses.field(default_factory=lambda: RouterConfig.for_kind("topk"))
    dispatcher: DispatcherConfig = dataclasses.field(default_factory=lambda: DispatcherConfig.for_kind("sort"))
    experts: ExpertsConfig = dataclasses.field(default_factory=lambda: ExpertsConfig.for_kind("glu"))
    shared_experts: SharedExpertsConfig = dataclasses.field(default_factory=SharedExpertsConfig)
    mask_padding: bool = True

    @property
    def routed_experts(self) -> int:
        return self.num_experts * self.granularity

    @property
    def routed_top_k(self) -> int:
        return self.top_k * self.granularity

    @property
    def expert_d_ff(self) -> int:
        return self.d_ff // self.granularity

    def validate(self, path: str) -> None:
        require(self.top_k <= self.num_experts, f"{path}.top_k", self.top_k,
                f"must be <= num_experts ({self.num_experts})")
        require(self.d_ff % self.granularity == 0, f"{path}.granularity", self.granularity,
                f"must divide d_ff ({self.d_ff})")
        self.router.validate_moe(f"{path}.router", self)
        self.dispatcher.validate_moe(f"{path}.dispatcher", self)
        self.experts.validate_moe(f"{path}.experts", self)
        need = ROUTERS.get(self.router.kind).requires_dispatcher
        require(need is None or self.dispatcher.kind == need, f"{path}.dispatcher.kind", self.dispatcher.kind,
                f"router {self.router.kind!r} needs dispatcher {need!r}")

    def build(self, d_model: int, *, causal: bool = False) -> MoELayer:
        return MoELayer(self, d_model, causal=causal)


#: ``fn(layer, decision, plan)``, called after every forward (see :meth:`MoELayer.register_routing_hook`).
RoutingHook = Callable[["MoELayer", RoutingDecision, DispatchPlan], None]


class MoELayer(nn.Module):
    """Sparse MoE layer (Shazeer et al. 2017; Lepikhin et al. 2020; Fedus et al. 2021): pure composition."""

    def __init__(self, cfg: MoEConfig, d_model: int, *, causal: bool = False):
        super().__init__()
        self.cfg, self.d_model = cfg, d_model
        E, k, F = cfg.routed_experts, cfg.routed_top_k, cfg.expert_d_ff
        self.num_experts, self.top_k = E, k
        self.router = cfg.router.build(d_model, E, k, causal=causal)
        self.dispatcher = cfg.dispatcher.build(E, k)
        self.experts = cfg.experts.build(d_model, F, E)
        sh = cfg.shared_experts
        self.shared_experts = (DenseFFN(d_model, sh.num * (sh.d_ff or F), sh.activation, sh.gated, sh.bias)
                               if sh.num > 0 else None)
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if sh.num > 0 and sh.gate == "sigmoid" else None
        self._last = LastForward()  # the last forward's decision and plan (aux_losses, aux_stats, last_stats)
        self._routing_hooks: OrderedDict[int, RoutingHook] = OrderedDict()

    @property
    def layer_name(self) -> str:
        name: str = self.router.layer_name
        return name

    @layer_name.setter
    def layer_name(self, name: str) -> None:
        self.router.layer_name = name

    def forward(self, x: Tensor, mask: Tensor | None = None, **ctx: Any) -> Tensor:
        if (not torch.is_grad_enabled() and x.numel() == self.d_model and x.shape[-1] == self.d_model
                and not self.training and not self._routing_hooks and self._one_token_parts() is not None
                and (mask is None or bool(mask))):
            return self._one_token(x)
        x_TD, mask_T, ctx = self._flatten(x, mask, ctx)
        decision = self.router(x_TD, mask_T if self.cfg.mask_padding else None, **ctx)
        plan = self.dispatcher.plan(decision)
        y_TD: Tensor = self.experts(x_TD, plan)
        if self.shared_experts is not None:
            y_TD = self._add_shared(x_TD, y_TD, mask_T if self.cfg.mask_padding else None)

        last = LastForward(decision, plan, self.router.loss_coefs())
        if torch.is_grad_enabled():  # in this forward's autograd context (a recomputation saves the same
            last.aux_losses()        # tensors for backward); under no_grad only when read
        if recomputing():  # activation checkpointing: the first forward did the bookkeeping (moe/recompute.py)
            return y_TD.reshape(x.shape)
        self._last = last
        for hook in list(self._routing_hooks.values()):
            hook(self, decision, plan)
        return y_TD.reshape(x.shape)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in ("router", "dispatcher", "experts"):  # a transform swapped a component
            self.__dict__.pop("_parts", None)

    def _one_token_parts(self) -> tuple[TopKRouter, Experts] | None:
        """The router and experts when the one-token path applies to this layer's components (a top-k router
        and the sort dispatcher), cached until a component is replaced."""
        parts = self.__dict__.get("_parts", False)
        if parts is False:
            router, ok = self.router, type(self.dispatcher) is SortDispatcher
            parts = (router, self.experts) if ok and type(router) is TopKRouter else None
            self.__dict__["_parts"] = parts
        return parts  # type: ignore[no-any-return]

    def _one_token(self, x: Tensor) -> Tensor:
        """One token, no autograd, eval, top-k router and sort dispatcher (a batch-1 decode step): the same ops
        as the general path on the same values, so the output is bitwise equal, without its per-call Python
        (Router.forward's mask handling; the decision, its statistics and the plan are built only if
        :attr:`last_stats` or :attr:`aux_losses` is read). Plain FFN experts on the CPU run the active backend's
        :func:`token_experts` on the chosen experts directly (:meth:`_one_token_ffn`); other experts get
        ``sort_plan``'s plan."""
        parts = self._one_token_parts()
        assert parts is not None
        router, experts = parts
        x_TD = x.reshape(1, self.d_model)
        if isinstance(experts, FFNExperts):
            ffn = experts.one_token_ffn(x_TD, router.top_k)
            if ffn is not None:
                return self._one_token_ffn(x_TD, router, ffn, experts.one_token_views(ffn)).reshape(x.shape)
        check_finite(x_TD, router.layer_name)
        chosen = router.choose(x_TD)
        ids_N, w_N = chosen[2].reshape(-1), chosen[3].reshape(-1)
        plan = self._token_plan(ids_N, w_N)
        y_TD: Tensor = experts(x_TD, plan)
        if self.shared_experts is not None:
            y_TD = self._add_shared(x_TD, y_TD, None)
        self._record(router, chosen, plan)
        return y_TD.reshape(x.shape)

    def _one_token_ffn(self, x_TD: Tensor, router: TopKRouter, ffn: StackedFFN, views: ExpertViews) -> Tensor:
        """:meth:`_one_token` for plain FFN experts (``ffn`` from their ``one_token_ffn``, ``views`` from their
        ``one_token_views``): ``y_TD`` of the one token ``x_TD`` ``[1, D]``. The decode plan
        (:mod:`moesaic.inference.decode_plan`) calls it directly after checking what :meth:`forward` checks."""
        # A NaN or inf in the input makes every logit non-finite and every softmax weight NaN: with the weights
        # read on the host anyway, the input check runs only then (same error, two ops and a sync fewer).
        late_check = router.cfg.score_func == "softmax"
        if not late_check:
            check_finite(x_TD, router.layer_name)
        chosen = router.choose(x_TD)
        ids, ws = chosen[2].tolist()[0], chosen[3].tolist()[0]
        if late_check and not all(map(math.isfinite, ws)):
            check_finite(x_TD, router.layer_name)
        order = sorted(range(len(ids)), key=ids.__getitem__)  # top-k ids are distinct; the plan's order is by id
        y_TD = token_experts(x_TD, ffn, [ids[i] for i in order], [ws[i] for i in order], views)
        if self.shared_experts is not None:
            y_TD = self._add_shared(x_TD, y_TD, None)
        self._record(router, chosen, lambda: self._token_plan(chosen[2].reshape(-1), chosen[3].reshape(-1)))
        return y_TD

    def _token_plan(self, ids_N: Tensor, w_N: Tensor) -> DispatchPlan:
        """``sort_plan``'s plan of one token's distinct choices."""
        return DispatchPlan(torch.zeros(ids_N.shape[0], dtype=torch.long, device=ids_N.device),
                            w_N[torch.argsort(ids_N, stable=True)], torch.bincount(ids_N, minlength=self.num_experts),
                            1)

    def _record(self, router: TopKRouter, chosen: tuple[Tensor, Tensor, Tensor, Tensor],
                plan: DispatchPlan | Callable[[], DispatchPlan]) -> None:
        """Keep a one-token forward's choice; its decision and statistics are built only when read. A plain
        attribute, set without nn.Module.__setattr__'s parameter/module bookkeeping (a per-token cost)."""
        object.__setattr__(self, "_last", LastForward(lambda: router.decision(*chosen, count_now=False), plan,
                                                      router.loss_coefs))

    def _flatten(self, x: Tensor, mask: Tensor | None, ctx: dict[str, Any]
                 ) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        """``[..., D]`` -> ``x_TD``; the mask and token-shaped context tensors alike (module docstring)."""
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise RoutingInputError(f"{self.layer_name}: input of shape {tuple(x.shape)} has width "
                                    f"{x.shape[-1] if x.dim() else None}; expected d_model = {self.d_model} "
                                    "in the last dimension ([T, d_model] or [B, S, d_model])")
        lead = x.shape[:-1]
        x_TD = x.reshape(-1, self.d_model)
        mask_T = mask.reshape(-1) if mask is not None else None
        if mask_T is not None and mask_T.dtype != torch.bool:
            mask_T = mask_T.to(torch.bool)
        if mask is not None and mask.numel() != x_TD.shape[0]:
            raise RoutingInputError(f"{self.layer_name}: padding mask of shape {tuple(mask.shape)} does not match "
                                    f"the input of shape {tuple(x.shape)} (one entry per token)")
        if len(lead) > 1:
            if x.dim() == 3 and "seq_ids_T" not in ctx and self.router.uses_seq_ids():
                ctx["seq_ids_T"] = torch.arange(lead[0], device=x.device).repeat_interleave(lead[1])
            ctx = {k: (v.reshape(-1, *v.shape[len(lead):]) if isinstance(v, Tensor) and v.shape[:len(lead)] == lead
                       else v) for k, v in ctx.items()}
        return x_TD, mask_T, ctx

    def _add_shared(self, x_TD: Tensor, y_TD: Tensor, mask_T: Tensor | None) -> Tensor:
        """Routed plus shared experts (summed or averaged); padding rows stay 0."""
        assert self.shared_experts is not None
        x_sh = x_TD if mask_T is None else x_TD.masked_fill(~mask_T.unsqueeze(1), 0.0)  # padding may be NaN
        s_TD = self.shared_experts(x_sh)
        if self.shared_gate is not None:
            s_TD = torch.sigmoid(self.shared_gate(x_sh)) * s_TD
        y_TD = (y_TD + s_TD) / 2 if self.cfg.shared_experts.combine == "average" else y_TD + s_TD
        return y_TD if mask_T is None else y_TD * mask_T.unsqueeze(1).to(y_TD.dtype)

    def register_routing_hook(self, fn: RoutingHook) -> RemovableHandle:
        """Call ``fn(layer, decision, plan)`` after every forward (recording, analysis); ``handle.remove()``
        stops it. Hooks observe: they must not change the decision or the plan."""
        handle = RemovableHandle(self._routing_hooks)
        self._routing_hooks[handle.id] = fn
        return handle

    @property
    def aux_losses(self) -> dict[str, Tensor]:
        """The last forward's aux losses, weighted by the router's coefficients (summed over the model by
        :func:`moesaic.collect_aux_losses`)."""
        return self._last.aux_losses()

    @aux_losses.setter
    def aux_losses(self, value: dict[str, Tensor]) -> None:
        self._last.aux = value

    @property
    def aux_stats(self) -> dict[str, Any]:
        """The last forward's unweighted aux-loss statistic objects (exact shares of split batches)."""
        return dict(self._last.decision.aux_stats) if self._last.decision is not None else {}

    @property
    def last_stats(self) -> dict[str, Any]:
        """Detached routing statistics of the last forward, for logging: ``tokens_per_expert``, ``dropped``,
        ``assignments``, ``tokens`` and (routers with probabilities) the mean routing ``entropy``."""
        return self._last.stats()


class LastForward:
    """What an MoE layer keeps of its last forward. The weighted aux losses and the logging statistics are
    built from it when first read, so a decode step that reads neither pays for neither."""

    __slots__ = ("_decision", "_plan", "_coefs", "aux", "_stats")

    def __init__(self, decision: RoutingDecision | Callable[[], RoutingDecision] | None = None,
                 plan: DispatchPlan | Callable[[], DispatchPlan] | None = None,
                 coefs: dict[str, float] | Callable[[], dict[str, float]] | None = None):
        self._decision, self._plan, self._coefs = decision, plan, coefs or {}
        self.aux: dict[str, Tensor] | None = None if decision is not None else {}
        self._stats: dict[str, Any] | None = None if decision is not None else {}

    @property
    def decision(self) -> RoutingDecision | None:
        """The decision (built on first access when the forward left a function for it)."""
        if callable(self._decision):
            self._decision = self._decision()
        return self._decision

    @property
    def plan(self) -> DispatchPlan | None:
        if callable(self._plan):
            self._plan = self._plan()
        return self._plan

    @property
    def coefs(self) -> dict[str, float]:
        """The router's loss coefficients (read when the losses are, for a decode step's lazy record)."""
        if callable(self._coefs):
            self._coefs = self._coefs()
        return self._coefs

    def aux_losses(self) -> dict[str, Tensor]:
        if self.aux is None:
            assert self.decision is not None
            coefs = self.coefs
            self.aux = {n: coefs[n] * v for n, v in self.decision.aux_losses.items() if coefs.get(n, 0.0) > 0}
        return self.aux

    @torch.no_grad()
    def stats(self) -> dict[str, Any]:
        if self._stats is not None:
            return self._stats
        decision, plan = self.decision, self.plan
        assert decision is not None and plan is not None
        stats: dict[str, Any] = {"tokens_per_expert": plan.counts_E.detach(), "dropped": int(plan.dropped),
                                 "assignments": decision.num_assignments, "tokens": decision.valid_tokens}
        if decision.probs_TE is not None and decision.probs_TE.shape[0]:
            p = decision.probs_TE.detach()
            s_T = p.sum(-1, keepdim=True)
            valid_T = (s_T.squeeze(-1) > 0).to(p.dtype)  # padding rows are all zero; no boolean indexing
            p = p / torch.where(s_T > 0, s_T, torch.ones_like(s_T))
            ent_T = -(p * p.clamp_min(1e-30).log()).sum(-1)
            stats["entropy"] = (ent_T * valid_T).sum() / valid_T.sum()  # tensor: no device sync
        self._stats = stats
        return stats
