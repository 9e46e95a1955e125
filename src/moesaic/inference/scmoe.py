"""SCMoE, self-contrast decoding of an MoE model (Shi et al. 2024, "Unchosen Experts Can Contribute Too:
Unleashing MoE Models' Power by Self-Contrast").

Each step runs the model twice: the **strong** pass routes as trained (top-k); the **weak** pass routes
every token to its rank-r expert alone (the "unchosen" expert; r = ``weak_rank``, the paper's rank-2
routing for Mixtral's top-2) with weight 1. The next-token scores are the contrast with the adaptive
plausibility cut of contrastive decoding (Li et al. 2023), the paper's Eq. 4-5:

    score(x) = (1 + beta) log p_s(x) - beta log p_w(x)   if  p_s(x) >= alpha * max_w p_s(w)
    score(x) = -inf                                       otherwise

``beta = 0`` is the strong model; ``alpha = 0`` switches the cut off (then perplexity is finite).
``scmoe_(model, ...)`` wraps every MoE layer's router (a transform: the layer is untouched) and returns
an :class:`SCMoELM` that ``moesaic.generate``/``complete`` and ``moesaic eval`` accept; each pass keeps
its own KV cache (the weak pass's hidden states differ after the first MoE layer).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.core.errors import ConfigError
from moesaic.core.types import RoutingDecision
from moesaic.inference.kv_cache import CacheView
from moesaic.inference.wrapped_lm import WrappedLM, WrappedOutput
from moesaic.moe.layer import MoELayer
from moesaic.moe.routing.base import stable_topk

WEAK_LAYER_OFFSET = 1 << 20  # the weak pass's layers in a shared static cache


class RankRouter(nn.Module):
    """Wraps a router. ``weak = False``: its decision unchanged; ``weak = True``: each routed token goes to
    the expert of rank ``rank`` (1 = best) of the router's scores, weight 1."""

    def __init__(self, inner: nn.Module, rank: int):
        super().__init__()
        self.inner, self.rank, self.weak = inner, rank, False

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, x_TD: Tensor, mask_T: Tensor | None = None, **ctx: Any) -> RoutingDecision:
        d: RoutingDecision = self.inner(x_TD, mask_T, **ctx)
        if not self.weak:
            return d
        if d.probs_TE is None:
            raise ConfigError("scmoe", type(self.inner).__name__, "needs a router that returns scores (probs_TE)")
        ids_T1 = stable_topk(d.probs_TE, self.rank)[1][:, self.rank - 1:]
        routed_T = d.experts_per_token() > 0  # padding rows have no assignment
        ids_T1 = ids_T1.masked_fill(~routed_T[:, None], -1)
        return RoutingDecision.from_topk(ids_T1, torch.ones_like(ids_T1, dtype=d.probs_TE.dtype), d.num_experts,
                                         probs_TE=d.probs_TE, logits_TE=d.logits_TE)


def contrast(strong_V: Tensor, weak_V: Tensor, beta: float, alpha: float) -> Tensor:
    """SCMoE scores from strong and weak logits ``[..., V]`` (module docstring)."""
    lp_s, lp_w = strong_V.float().log_softmax(-1), weak_V.float().log_softmax(-1)
    score = (1 + beta) * lp_s - beta * lp_w
    if alpha > 0:
        cut = lp_s < math.log(alpha) + lp_s.amax(-1, keepdim=True)
        score = score.masked_fill(cut, float("-inf"))
    return score


class SCMoELM(WrappedLM):
    def __init__(self, inner: nn.Module, routers: list[RankRouter], beta: float, alpha: float):
        super().__init__(inner)
        self.routers, self.beta, self.alpha = routers, beta, alpha

    def _pass(self, weak: bool, input_ids: Tensor, cache: Any, **kw: Any) -> Tensor:
        for r in self.routers:
            r.weak = weak
        try:
            out = self.inner(input_ids, past_key_values=cache, **kw)
        finally:
            for r in self.routers:
                r.weak = False
        logits: Tensor = out.logits if hasattr(out, "logits") else out
        return logits

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: Any = None, **kw: Any) -> WrappedOutput:
        if past_key_values is not None and not isinstance(past_key_values, CacheView):
            raise TypeError("SCMoE decoding needs moesaic.generate's static cache (two passes, two caches)")
        weak_cache = past_key_values.sibling(WEAK_LAYER_OFFSET) if past_key_values is not None else None
        kw = dict(attention_mask=attention_mask, position_ids=position_ids)
        strong = self._pass(False, input_ids, past_key_values, **kw)
        weak = self._pass(True, input_ids, weak_cache, **kw)
        return WrappedOutput(contrast(strong, weak, self.beta, self.alpha))

    def unwrap(self) -> nn.Module:
        for m in self.inner.modules():
            if isinstance(m, MoELayer) and isinstance(m.router, RankRouter):
                m.router = m.router.inner
        return self.inner


def scmoe_(model: nn.Module, beta: float = 0.5, alpha: float = 0.1, weak_rank: int = 2) -> SCMoELM:
    """Wrap every MoE layer's router for self-contrast decoding; returns the decoding model."""
    if not beta >= 0 or not math.isfinite(beta):
        raise ConfigError("scmoe.beta", beta, "must be a finite number >= 0")
    if not 0 <= alpha < 1:
        raise ConfigError("scmoe.alpha", alpha, "must be in [0, 1)")
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ConfigError("scmoe", None, "the model has no MoE layer")
    routers = []
    for m in layers:
        if not 1 <= weak_rank <= m.num_experts:
            raise ConfigError("scmoe.weak_rank", weak_rank, f"must be in [1, num_experts] = [1, {m.num_experts}] "
                                                            f"({m.layer_name})")
        r = RankRouter(m.router, weak_rank)
        m.router = r
        routers.append(r)
    return SCMoELM(model, routers, beta, alpha)
