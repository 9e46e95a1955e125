"""Compute backends of stacked-FFN experts, registered by name in :data:`BACKENDS` (one file each).

A backend computes ``y_TD = combine(down_e(act(up_e(gather(x_TD)))))`` for a dispatch plan: every expert
e on its rows, weighted back into the tokens. :meth:`Backend.rows` is the kernel on rows already grouped
by expert; :meth:`Backend.run` wraps it in the plan's ``gather``/``combine``, and a backend that folds
gather and scatter into its kernel (``fused``) overrides ``run``.

* ``loop``: the readable reference, one matmul pair per expert (plain autograd).
* ``grouped_mm``: ``torch._grouped_mm``, one kernel per projection, where the build, device and dtype
  support it (probed once, lazily), else ``loop``.
* ``bmm``: every expert padded to the largest count and one ``torch.bmm`` (Tutel's ``cf=0``; Hwang et
  al. 2023): good when the load is balanced, wasteful otherwise.
* ``active``: a loop over the experts that received rows only, so idle experts' weights are never read.
* ``fused``: :class:`moesaic.moe.experts.grouped_glu.GroupedGLU`, gather -> FFN -> weighted scatter in one
  autograd function (ScatterMoE: Tan et al. 2024).

``auto`` (the default, :func:`resolve_backend`): ``active`` when ``N <= E / 2`` (decode: few rows against
many experts, most idle), ``fused`` otherwise (fastest and leanest in memory on our CPU measurements;
docs/benchmarks.md). ``moesaic bench layer`` times them all.
"""

from __future__ import annotations

from torch import Tensor

from moesaic.core.registry import Registry
from moesaic.core.types import DispatchPlan
from moesaic.moe.experts.kernels import StackedFFN


class Backend:
    """One way to compute stacked FFN experts. Stateless: the methods are class methods."""

    @classmethod
    def rows(cls, x_ND: Tensor, counts_E: Tensor, ffn: StackedFFN) -> Tensor:
        """``y_ND``: expert e's FFN on its ``counts_E[e]`` rows, rows grouped by expert."""
        raise NotImplementedError  # abstract: every registered backend implements it

    @classmethod
    def run(cls, x_TD: Tensor, plan: DispatchPlan, ffn: StackedFFN) -> Tensor:
        """``y_TD`` for a dispatch plan: gather, :meth:`rows`, weighted combine."""
        return plan.combine(cls.rows(plan.gather(x_TD), plan.counts_E, ffn))


BACKENDS: Registry[type[Backend]] = Registry("experts backend", "moesaic.moe.experts.backends")


def decode_rule(num_rows: int, num_experts: int) -> bool:
    """Few rows against many experts: most experts idle, so touch only the active ones."""
    return 2 * num_rows <= num_experts


def resolve_backend(name: str, num_rows: int, num_experts: int) -> str:
    """Resolve ``auto`` (rule in the module docstring) from the row and expert counts; other names unchanged."""
    if name != "auto":
        return name
    return "active" if decode_rule(num_rows, num_experts) else "fused"


def backend_names() -> list[str]:
    """Every registered backend name (``auto`` not included)."""
    return BACKENDS.names()


__all__ = ["BACKENDS", "Backend", "backend_names", "decode_rule", "resolve_backend"]
