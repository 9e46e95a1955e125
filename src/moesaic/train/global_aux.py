"""Aux losses of a batch split into parts (gradient-accumulation micro-batches, data/expert-parallel ranks):
each part's router losses are rewritten to that part's *share* of the whole batch's loss.

One router forward hook serves both splits. The batch totals of each router's statistics come

* from an all-reduce over ``batch_group`` of the current forward's statistics (expert/data parallelism,
  one micro-batch per step or per-micro-batch losses:
  :func:`moesaic.distributed.expert_parallel.apply_expert_parallel_`),
* from a no-grad **pre-pass** over the step's micro-batches (:meth:`GlobalAux.prepass`: exact gradient
  accumulation), all-reduced over ``batch_group`` once when there is one (both splits at once).

Shares (:mod:`moesaic.moe.routing.aux_stats`): every router loss is a statistic in
``RoutingDecision.aux_stats`` and gets ``w L(S) + g . (S_part - w S)`` with ``w = t_part / T`` (exact value
and gradient for any function of additive statistics; a token mean such as the z-loss gets its
``value * t_part / T``). Shares sum to the whole batch's loss and their gradients to its gradient.

The pre-pass repeats the real forward passes exactly: the torch RNG (and CUDA RNG when initialised) is
saved and restored around it, so stochastic routers and dropout draw the same numbers, and the MoE
layers' buffers (e.g. the aux-loss-free bias's step loads) are restored, so nothing is counted twice.
Train/eval mode is not touched. Routers are keyed by their firing index within a micro-batch, so a step
that runs several forwards per micro-batch (THOR's two passes) gets one total per pass.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.moe.routing import aux_stats

#: Attribute of the model that holds its :class:`GlobalAux`.
ATTR = "_moesaic_global_aux"


class _PrepassDone(Exception):
    """Raised by the hook when the pre-pass has seen every router of a micro-batch (skips the rest)."""


def _group_size(group: Any) -> int:
    if group is None:
        return 1
    from moesaic.distributed.groups import group_size

    return group_size(group)


def _all_reduce(t: Tensor, group: Any) -> Tensor:
    from moesaic.distributed.collectives import all_reduce_sum

    return all_reduce_sum(t, group)


def _losses(model: nn.Module) -> Iterator[tuple[str, str, str, nn.Module]]:
    """``(layer, router kind, loss, router)`` for every router aux loss with a non-zero coefficient."""
    from moesaic.moe.api import moe_layers

    for layer in moe_layers(model):
        r = layer.router
        kind = getattr(getattr(r, "cfg", None), "kind", type(r).__name__)
        for name, coef in r.loss_coefs().items():
            if coef > 0:
                yield layer.layer_name, kind, name, r


def batch_stat_losses(model: nn.Module) -> list[tuple[str, str, str]]:
    """``(layer, router kind, loss)`` for the aux losses with a non-zero coefficient of every router whose split
    batches need the batch totals (``Router.needs_batch_totals``)."""
    return [(n, k, loss) for n, k, loss, r in _losses(model) if r.needs_batch_totals()]


def unsplittable_losses(model: nn.Module) -> list[tuple[str, str, str]]:
    """None: every router aux loss is a statistic (``RoutingDecision.aux_stats``), so every one splits exactly."""
    return []


class _Share(aux_stats.AuxStat):
    """A part's share of the batch's loss, as the statistic the rewritten decision reports."""

    def __init__(self, share: Tensor):
        self.share_value = share

    def stats(self) -> dict[str, Tensor]:
        return {"share": self.share_value}

    def fn(self, s: Mapping[str, Tensor]) -> Tensor:
        return s["share"]


class GlobalAux:
    """The hook state of one model. Modes: ``local`` (no pre-pass totals: all-reduce each forward over
    ``batch_group``, or leave the losses alone without one), ``collect`` (pre-pass), ``apply``."""

    def __init__(self, batch_group: Any = None):
        self.batch_group = batch_group
        self.mode = "local"
        self.fired: dict[int, int] = {}  # id(router) -> forwards since the micro-batch began
        self.micro = -1
        self.totals: dict[tuple[int, int], dict[str, Any]] = {}  # (router index, firing) -> totals
        self.seen: dict[tuple[int, int, int], Tensor] = {}  # (micro, router index, firing) -> counts
        self.warned = False
        self.count = 0  # aux-loss router forwards in this micro-batch
        self.stop_after: int | None = None  # pre-pass: end a micro-batch's forwards after this many

    # ------------------------------------------------------------------------------------ install
    @staticmethod
    def install(model: nn.Module, batch_group: Any = None) -> GlobalAux:
        """The model's :class:`GlobalAux`, hooked into every MoE router (once); ``batch_group`` is set
        when given (expert parallelism)."""
        from moesaic.moe.api import moe_layers

        ga = getattr(model, ATTR, None)
        if ga is None:
            ga = GlobalAux(batch_group)
            for i, layer in enumerate(moe_layers(model)):
                layer.router._moesaic_aux_index = i  # module order: the same on every rank (survives deepcopy)
                layer.router.register_forward_hook(ga._hook, with_kwargs=True)
            object.__setattr__(model, ATTR, ga)  # not a submodule: no state_dict entry
        elif batch_group is not None:
            ga.batch_group = batch_group
        return ga

    # ------------------------------------------------------------------------------ step protocol
    def prepass(self, model: nn.Module, micro: Iterable[Any], run: Callable[[Any], Any]) -> None:
        """Collect the step's totals: ``run(mb)`` (the real pass's forwards of one micro-batch) under
        ``no_grad`` for every micro-batch, RNG and MoE buffers restored afterwards; then ``apply`` mode."""
        from moesaic.moe.api import moe_layers

        self.totals, self.seen, self.micro, self.stop_after = {}, {}, -1, None
        buffers = [(b, b.detach().clone()) for layer in moe_layers(model) for b in layer.buffers()]
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.mode = "collect"
        try:
            with torch.no_grad():
                for j, mb in enumerate(micro):
                    self.next_micro()
                    try:
                        run(mb)
                    except _PrepassDone:
                        pass
                    if j == 0 and self.count > 0:
                        # the first micro-batch ran completely and counted the router forwards that carry
                        # aux losses; later ones stop after the last of them (skipping the last layer's
                        # experts, the head and the loss). Every rank stops at the same point (EP).
                        self.stop_after = self.count
        finally:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            self.mode = "local"
        if _group_size(self.batch_group) > 1:
            self._reduce_totals()
        self.mode, self.micro = "apply", -1

    def next_micro(self) -> None:
        """Call before the forward(s) of each micro-batch (pre-pass and real pass alike)."""
        self.fired, self.micro, self.count = {}, self.micro + 1, 0

    def end_step(self) -> None:
        self.mode, self.totals, self.seen, self.fired, self.micro = "local", {}, {}, {}, -1
        self.count, self.stop_after = 0, None

    @contextlib.contextmanager
    def step(self, model: nn.Module, micro: list[Any], run: Callable[[Any], Any],
             enabled: bool = True) -> Iterator[bool]:
        """``with ga.step(model, micro, run) as exact:`` runs the pre-pass (when ``enabled``), yields whether
        the aux losses are now shares of the step, and always leaves ``local`` mode."""
        try:
            if enabled:
                self.prepass(model, micro, run)
            yield enabled
        finally:
            self.end_step()

    # ------------------------------------------------------------------------------------- the hook
    def _hook(self, router: nn.Module, args: tuple, kwargs: dict, decision):
        if not decision.aux_losses:
            return decision
        if self.mode == "local":
            if _group_size(self.batch_group) == 1:
                return decision
            local = self._local(decision)
            return self._rewrite(router, decision, local, self._reduce_one(local))
        i = router._moesaic_aux_index
        k = self.fired.get(id(router), 0)
        self.fired[id(router)] = k + 1
        key = (i, k)
        if self.mode == "collect":
            local = self._local(decision)
            tot = self.totals.setdefault(key, {"T": 0.0, "stats": {}})
            tot["T"] += local["T"]
            for name, st in local["stats"].items():
                acc = tot["stats"].setdefault(name, {})
                for s, v in st.items():
                    v = v.detach().to(torch.float64)
                    acc[s] = acc[s] + v if s in acc else v.clone()
            self.seen[(self.micro, i, k)] = decision.tokens_per_expert()
            self.count += 1
            if self.stop_after is not None and self.count >= self.stop_after:
                raise _PrepassDone
            return decision
        if key not in self.totals:
            raise RuntimeError(f"{getattr(router, 'layer_name', 'router')}: forward {k + 1} of this micro-batch has no "
                               "pre-pass statistics (the pre-pass must run the same forwards as the real pass)")
        seen = self.seen.get((self.micro, i, k))
        if not self.warned and (seen is None or not torch.equal(seen, decision.tokens_per_expert())):
            self.warned = True
            warnings.warn(f"{getattr(router, 'layer_name', 'router')}: routing differed between the aux pre-pass and "
                          "the real pass (an RNG or numerics difference); the step's aux shares are approximate",
                          stacklevel=2)
        return self._rewrite(router, decision, self._local(decision), self.totals[key])

    # ------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _local(decision) -> dict[str, Any]:
        return {"T": float(decision.valid_tokens),
                "stats": {n: st.stats() for n, st in decision.aux_stats.items() if n in decision.aux_losses}}

    def _rewrite(self, router: nn.Module, decision, local: dict[str, Any], total: dict[str, Any]):
        T_tot = float(total["T"])
        w = local["T"] / T_tot if T_tot > 0 else 0.0
        token_mean = getattr(router, "token_mean_losses", frozenset({"z"}))
        out = {}
        for name, value in decision.aux_losses.items():
            if name in local["stats"] and name in total["stats"]:
                out[name] = aux_stats.share(decision.aux_stats[name], local["stats"][name], total["stats"][name], w)
            elif name in token_mean or self.mode == "local":
                out[name] = value * w  # a token mean (or EP's historical fallback for undeclared losses)
            else:
                raise RuntimeError(f"{getattr(router, 'layer_name', 'router')}: aux loss {name!r} is neither a token "
                                   "mean nor declared in RoutingDecision.aux_stats; it cannot be split exactly")
        return decision.replace(aux_stats={n: _Share(v) for n, v in out.items()})

    def _flat(self, items: list[dict[str, Any]]) -> tuple[Tensor, list]:
        vals = [v for tot in items for st in tot["stats"].values() for v in st.values()]
        dev = vals[0].device if vals else torch.device("cpu")  # the collective's device (gloo: cpu, nccl: cuda)
        parts, layout = [], []
        for j, tot in enumerate(items):
            parts.append(torch.tensor([float(tot["T"])], dtype=torch.float64, device=dev))
            layout.append((j, None, None, None))
            for name in sorted(tot["stats"]):
                for s in sorted(tot["stats"][name]):
                    v = tot["stats"][name][s]
                    parts.append(v.detach().to(dev, torch.float64).reshape(-1))
                    layout.append((j, name, s, v))
        return torch.cat(parts), layout

    def _unflat(self, flat: Tensor, layout: list, n: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"T": 0.0, "stats": {}} for _ in range(n)]
        pos = 0
        for j, name, s, v in layout:
            if name is None:
                out[j]["T"] = float(flat[pos])
                pos += 1
                continue
            m = v.numel()
            out[j]["stats"].setdefault(name, {})[s] = flat[pos:pos + m].view(v.shape).to(v.device)
            pos += m
        return out

    def _reduce_one(self, local: dict[str, Any]) -> dict[str, Any]:
        flat, layout = self._flat([local])
        return self._unflat(_all_reduce(flat, self.batch_group), layout, 1)[0]

    def _reduce_totals(self) -> None:
        keys = sorted(self.totals)  # router index and firing: the same order on every rank
        flat, layout = self._flat([self.totals[k] for k in keys])
        reduced = self._unflat(_all_reduce(flat, self.batch_group), layout, len(keys))
        self.totals = dict(zip(keys, reduced))
