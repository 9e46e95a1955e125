"""Aux losses as statistics: each loss is written once, and is exact on any split of a batch.

A router's aux loss (a balance loss, the router z-loss, an entropy term) is an :class:`AuxStat`:

* ``stats()``: tensors that ADD over disjoint parts of a batch (micro-batches of gradient accumulation,
  data- or expert-parallel ranks): expert counts, sums of router probabilities, token counts;
* ``fn(stats)``: the loss of given totals, the only place its formula is written;
* ``value() = fn(stats())``: the loss of the local batch. ``RoutingDecision.aux_losses`` is derived from it,
  so the local loss, the accumulated loss and the global-batch loss all evaluate the same ``fn``.

A balance loss such as Switch's ``E * sum_e f_e P_e`` is not a mean over tokens, so its value on a batch is
not the token-weighted mean of its values on the parts; it is, however, ``L(S)`` of statistics that add,
``S = sum_m S_m``. Given the totals ``S`` (a no-grad pre-pass over the micro-batches, an all-reduce over
ranks, or both), part ``m`` contributes the share (:meth:`AuxStat.share`)

    share_m = w_m L(S) + g . (S_m - w_m S),    g = dL/dS at S (no grad),    sum_m w_m = 1,

linearised in the statistics that carry a gradient (no-grad ones, such as the counts behind ``f``, enter
through ``L(S)`` only). The shares' values sum to ``L(S)`` and their gradients to ``g . sum_m dS_m = dL(S)``:
exactly the loss and gradient of the whole batch, for any ``L`` (the CV^2 of Shazeer et al. 2017 is not
linear in its statistics). A token mean is the statistic pair (sum, count), so its share is ``sum_m / T``
and needs no special case. Callers use ``w_m = t_m / T`` (routed tokens).

Writing a new loss: subclass :class:`AuxStat` with a ``stats`` and an ``fn``, or combine the ones here
(:class:`Sum`, :class:`TokenMean`); nothing else changes (docs/design.md, Balance statistics).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import torch
from torch import Tensor


class AuxStat(abc.ABC):
    """An aux loss as a function ``fn`` of statistics ``stats()`` that add over disjoint parts of a batch.

    ``stats()`` is evaluated when asked (in the same forward, so the statistics keep their autograd graph);
    a router that builds a statistic pays for it only through ``value()`` or a split batch's ``share``.
    """

    @abc.abstractmethod
    def stats(self) -> dict[str, Tensor]:
        """Statistics of the local batch; each entry adds over disjoint parts of a batch."""

    @abc.abstractmethod
    def fn(self, s: Mapping[str, Tensor]) -> Tensor:
        """The loss of the statistics ``s`` (local ones, or totals over the parts of a batch)."""

    def value(self) -> Tensor:
        """The loss of the local batch, ``fn(stats())``."""
        return self.fn(self.stats())

    def share(self, local: Mapping[str, Tensor], total: Mapping[str, Tensor], w: float) -> Tensor:
        """This part's share ``w L(S) + g . (S_m - w S)`` of ``fn(total)`` (module docstring); ``local`` are
        this part's ``stats()`` (with their graph), ``total`` the detached sums over all parts."""
        leaves = {k: v.detach().to(torch.float64).requires_grad_(True) for k, v in total.items()}
        keys = [k for k, v in local.items() if v.requires_grad]
        with torch.enable_grad():
            L = self.fn(leaves)
            grads: list[Tensor | None] = [None] * len(keys)
            if keys and L.requires_grad:
                grads = list(torch.autograd.grad(L, [leaves[k] for k in keys], allow_unused=True))
        ref = next(iter(local.values()))
        out = (w * L.detach()).to(ref.dtype)
        for k, g in zip(keys, grads):
            if g is not None:
                v = local[k]
                out = out + (g.to(v.dtype) * (v - w * total[k].to(v.device, v.dtype))).sum()
        return out


def share(stat: AuxStat, local: Mapping[str, Tensor], total: Mapping[str, Tensor], w: float) -> Tensor:
    """:meth:`AuxStat.share` as a function."""
    return stat.share(local, total, w)


def count(n: int, like: Tensor) -> Tensor:
    """A count statistic (tokens, sequences) as a 0-dim tensor of ``like``'s dtype and device (a fill on the
    device, not a copy from the host, so no accelerator sync per forward)."""
    return like.new_full((), float(n))


class TokenMean(AuxStat):
    """``mean_t v_t`` of a per-token loss (router z-loss, entropy): statistics ``sum`` and ``count``, so a
    part's share is exactly ``sum_m / T``. An empty batch gives 0 (with a graph)."""

    def __init__(self, v_T: Tensor):
        self.v_T = v_T

    def stats(self) -> dict[str, Tensor]:
        return {"sum": self.v_T.sum(), "count": count(self.v_T.shape[0], self.v_T)}

    def fn(self, s: Mapping[str, Tensor]) -> Tensor:
        return s["sum"] / s["count"].clamp_min(1)


class Sum(AuxStat):
    """The sum of several losses as one statistic (each part's statistics prefixed by its name)."""

    def __init__(self, **parts: AuxStat):
        self.parts = parts

    def stats(self) -> dict[str, Tensor]:
        return {f"{p}.{k}": v for p, st in self.parts.items() for k, v in st.stats().items()}

    def fn(self, s: Mapping[str, Tensor]) -> Tensor:
        terms = [st.fn({k.split(".", 1)[1]: v for k, v in s.items() if k.split(".", 1)[0] == p})
                 for p, st in self.parts.items()]
        out = terms[0]
        for t in terms[1:]:
            out = out + t
        return out
