"""Exact aux losses of a batch split into parts (gradient-accumulation micro-batches, data/expert-parallel
ranks): each part's aux loss is its *share* of the whole batch's, so the shares add up to the batch's loss
and their gradients to its gradient (docs/training.md, "Loss under accumulation and padding").

After a forward, every MoE layer holds the unweighted statistic objects of its balance losses
(``layer.aux_stats``: additive statistics ``S_m`` with ``stats()``, and the loss ``fn(S)``) and its weighted
losses (``layer.aux_losses``). Given the batch totals ``S`` of a layer, a declared loss of part ``m`` gets

    w L(S) + g . (S_m - w S),    g = dL/dS at S,    w = t_m / T (routed tokens of the layer)

(:meth:`moesaic.moe.routing.aux_stats.AuxStat.share`; a token mean such as the z-loss is the statistic pair
(sum, count), so its share is ``sum_m / T``). The totals
come from

* :func:`aux_totals`: a no-grad **pre-pass** over the step's micro-batches (exact gradient accumulation),
  all-reduced over ``group`` once when one is given (data/expert parallelism as well);
* :func:`global_aux`: the statistics of the forward that just ran, all-reduced over ``group`` (one
  micro-batch of a step split over ranks).

Both give an :data:`AuxFn`: call it right after each forward with the model; it returns that forward's
share of the step's weighted aux loss. A loop of your own (the trainer does the same)::

    run = lambda mb, aux: (model(mb["input_ids"]), aux(model))   # the forward(s) of one micro-batch
    totals = aux_totals(model, micro, run)                          # no grad; RNG and buffers restored
    for i, mb in enumerate(micro):
        aux = totals.collector(i)
        logits = model(mb["input_ids"]).logits
        loss = ce_sum(logits, mb["labels"]) / N + aux(model)        # the share: no further weighting
        loss.backward()

A step that runs several forwards per micro-batch (THOR's two passes) calls ``aux`` after each; the pass
index is part of the key, so each pass has its own totals.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.distributed.collectives import all_reduce_sum
from moesaic.distributed.groups import group_size
from moesaic.moe.api import collect_aux_losses, moe_layers
from moesaic.moe.layer import MoELayer

#: ``aux(model) -> Tensor``: the aux loss of the forward that just ran, as its share of the step's.
AuxFn = Callable[[nn.Module], Tensor]
#: ``run(micro_batch, aux)``: the forward(s) of one micro-batch, calling ``aux(model)`` after each.
RunFn = Callable[[Any, AuxFn], object]

class AuxSplitError(RuntimeError):
    """The real pass does not match the pre-pass, or a loss cannot be split exactly."""


@dataclasses.dataclass
class LayerPart:
    """One layer's statistics in one forward: routed tokens and, per declared loss, its additive statistics."""

    tokens: float
    stats: dict[str, dict[str, Tensor]]


def read_parts(model: nn.Module) -> list[tuple[MoELayer, LayerPart]]:
    """Every MoE layer with the statistics of its last forward (only losses with a non-zero coefficient)."""
    out = []
    for layer in moe_layers(model):
        stats = {n: st.stats() for n, st in layer.aux_stats.items() if n in layer.aux_losses}
        out.append((layer, LayerPart(float(layer.last_stats.get("tokens", 0)), stats)))
    return out


def layer_share(layer: MoELayer, local: LayerPart, total: LayerPart, strict: bool = True) -> dict[str, Tensor]:
    """The layer's weighted aux losses as shares of ``total``. ``strict``: a loss without a statistic object
    raises (non-strict weighs it by the token share)."""
    w = local.tokens / total.tokens if total.tokens > 0 else 0.0
    coefs = layer.router.loss_coefs()
    out: dict[str, Tensor] = {}
    for name, value in layer.aux_losses.items():
        if name in local.stats and name in total.stats:
            out[name] = coefs[name] * layer.aux_stats[name].share(local.stats[name], total.stats[name], w)
        elif not strict:
            out[name] = value * w
        else:
            raise AuxSplitError(f"{layer.layer_name}: aux loss {name!r} has no statistic object in layer.aux_stats; "
                                "it cannot be split exactly")
    return out


def _sum(parts: Iterable[dict[str, Tensor]], model: nn.Module) -> Tensor:
    """Sum by loss name, then over names (the order of :func:`moesaic.collect_aux_losses`)."""
    total: dict[str, Tensor] = {}
    for d in parts:
        for n, v in d.items():
            total[n] = total[n] + v if n in total else v
    if not total:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return sum(total.values())  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ all-reduce
def _flat(parts: Sequence[LayerPart]) -> tuple[Tensor, list[tuple[int, str | None, str | None, Tensor | None]]]:
    vals = [v for p in parts for st in p.stats.values() for v in st.values()]
    dev = vals[0].device if vals else torch.device("cpu")  # the collective's device (gloo: cpu, nccl: cuda)
    chunks: list[Tensor] = []
    layout: list[tuple[int, str | None, str | None, Tensor | None]] = []
    for j, p in enumerate(parts):
        chunks.append(torch.tensor([p.tokens], dtype=torch.float64, device=dev))
        layout.append((j, None, None, None))
        for name in sorted(p.stats):
            for s in sorted(p.stats[name]):
                v = p.stats[name][s]
                chunks.append(v.detach().to(dev, torch.float64).reshape(-1))
                layout.append((j, name, s, v))
    return torch.cat(chunks), layout


def reduce_parts(parts: Sequence[LayerPart], group: Any) -> list[LayerPart]:
    """Detached float64 sums of ``parts`` over ``group`` (one flat all-reduce; every rank passes the same
    layout). Without a group: detached float64 copies."""
    flat, layout = _flat(parts)
    all_reduce_sum(flat, group)
    out = [LayerPart(0.0, {}) for _ in parts]
    pos = 0
    for j, name, s, v in layout:
        if name is None or s is None or v is None:
            out[j].tokens = float(flat[pos])
            pos += 1
            continue
        m = v.numel()
        out[j].stats.setdefault(name, {})[s] = flat[pos:pos + m].view(v.shape).to(v.device)
        pos += m
    return out


def global_aux(group: Any) -> AuxFn:
    """An :data:`AuxFn` whose totals are the current forward's statistics summed over ``group`` (every rank
    of the group holds a part of one batch and calls it after the same forward). Without a group of more
    than one rank it is :func:`moesaic.collect_aux_losses`."""
    if group_size(group) == 1:
        return collect_aux_losses

    def aux(model: nn.Module) -> Tensor:
        parts = read_parts(model)
        totals = reduce_parts([p for _, p in parts], group)
        return _sum((layer_share(layer, p, t, strict=False) for (layer, p), t in zip(parts, totals)), model)

    return aux


# --------------------------------------------------------------------------------------- pre-pass
class AuxTotals:
    """The batch totals of every layer's statistics per forward pass of a micro-batch (from :func:`aux_totals`)."""

    def __init__(self) -> None:
        self.totals: dict[tuple[int, int], LayerPart] = {}  # (pass, layer) -> totals
        self.seen: dict[tuple[int, int, int], Tensor] = {}  # (micro, pass, layer) -> tokens per expert
        self.warned = False

    def _recorder(self, micro: int) -> AuxFn:
        count = [0]

        def record(model: nn.Module) -> Tensor:
            k = count[0]
            count[0] += 1
            for j, (layer, part) in enumerate(read_parts(model)):
                tot = self.totals.setdefault((k, j), LayerPart(0.0, {}))
                tot.tokens += part.tokens
                for name, st in part.stats.items():
                    acc = tot.stats.setdefault(name, {})
                    for s, v in st.items():
                        v64 = v.detach().to(torch.float64)
                        acc[s] = acc[s] + v64 if s in acc else v64.clone()
                self.seen[(micro, k, j)] = layer.last_stats["tokens_per_expert"].detach().clone()
            return torch.zeros(())

        return record

    def reduce(self, group: Any) -> None:
        """Sum the totals over ``group`` (collective; keys are the same on every rank)."""
        if group_size(group) == 1:
            return
        keys = sorted(self.totals)
        self.totals = dict(zip(keys, reduce_parts([self.totals[k] for k in keys], group)))

    def collector(self, micro: int) -> AuxFn:
        """The :data:`AuxFn` of micro-batch ``micro`` of the real pass: each call (one per forward) returns
        that forward's exact share of the step's weighted aux loss."""
        count = [0]

        def aux(model: nn.Module) -> Tensor:
            k = count[0]
            count[0] += 1
            shares = []
            for j, (layer, part) in enumerate(read_parts(model)):
                if (k, j) not in self.totals:
                    raise AuxSplitError(f"{layer.layer_name}: forward {k + 1} of this micro-batch has no pre-pass "
                                        "statistics (the pre-pass must run the same forwards as the real pass)")
                seen = self.seen.get((micro, k, j))
                if not self.warned and (seen is None or not torch.equal(seen, layer.last_stats["tokens_per_expert"])):
                    self.warned = True
                    warnings.warn(f"{layer.layer_name}: routing differed between the aux pre-pass and the real pass "
                                  "(an RNG or numerics difference); the step's aux shares are approximate",
                                  stacklevel=2)
                shares.append(layer_share(layer, part, self.totals[(k, j)]))
            return _sum(shares, model)

        return aux


def aux_totals(model: nn.Module, micro_batches: Iterable[Any], run: RunFn, group: Any = None) -> AuxTotals:
    """The no-grad pre-pass: ``run(mb, record)`` for every micro-batch, where ``record(model)`` (called by
    ``run`` after each forward) adds the layers' statistics to the totals; then one all-reduce over ``group``.

    The pre-pass repeats the real forwards exactly: the torch RNG (and the CUDA RNG when initialised) is
    saved and restored around it, so stochastic routers and dropout draw the same numbers in the real pass,
    and the MoE layers' buffers (e.g. the aux-loss-free bias's step loads) are restored, so nothing is
    counted twice. Train/eval mode is not touched."""
    layers = moe_layers(model)
    buffers = [(b, b.detach().clone()) for layer in layers for b in layer.buffers()]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    out = AuxTotals()
    try:
        with torch.no_grad():
            for i, mb in enumerate(micro_batches):
                run(mb, out._recorder(i))
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    out.reduce(group)
    return out
