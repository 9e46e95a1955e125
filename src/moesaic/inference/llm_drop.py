"""LLM-Drop (He et al. 2024, "What Matters in Transformers? Not All Attention is Needed"): rank the
attention and MLP/MoE sublayers by how little they change the residual stream on calibration text, and
drop the most redundant ones.

A sublayer's block maps the residual stream ``X`` to ``Y = X + f(norm(X))``; its importance is
``1 - cos(X, Y)`` averaged over the calibration tokens (padding excluded). The ``n`` sublayers with the
highest cosine (least important) are replaced by a module that returns zeros, so ``Y = X``: the block is
skipped (a dropped attention also writes no KV cache). The scores are read with forward hooks on the
pre-norms and the sublayers; nothing in the model's code changes. ``handle.restore()`` puts them back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from moesaic.core.errors import ConfigError

Kind = Literal["attn", "mlp", "both"]


@dataclasses.dataclass(frozen=True)
class SublayerScore:
    layer: int
    kind: str         # "attn" or "mlp"
    cosine: float     # mean cos(X, Y) over calibration tokens; high = redundant

    @property
    def name(self) -> str:
        return f"model.layers.{self.layer}.{'self_attn' if self.kind == 'attn' else 'mlp'}"


def _blocks(model: nn.Module) -> list[Any]:
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None or not all(hasattr(b, "self_attn") and hasattr(b, "mlp") for b in layers):
        raise ConfigError("llm_drop", type(model).__name__, "needs a decoder LM with model.layers.N.{self_attn,mlp}")
    return list(layers)


@torch.no_grad()
def rank_sublayers(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> list[SublayerScore]:
    """Every sublayer's mean input/output cosine on the batches (``input_ids``, optional
    ``attention_mask``), most redundant first."""
    blocks = _blocks(model)
    sums: dict[tuple[int, str], list[float]] = {}
    inputs: dict[tuple[int, str], Tensor] = {}
    valid: list[Tensor | None] = [None]
    handles = []
    for i, b in enumerate(blocks):
        for kind, norm, sub in (("attn", b.input_layernorm, b.self_attn), ("mlp", b.post_attention_layernorm, b.mlp)):
            def pre(_m: nn.Module, args: tuple[Any, ...], key: tuple[int, str] = (i, kind)) -> None:
                inputs[key] = args[0]

            def post(_m: nn.Module, args: tuple[Any, ...], out: Tensor, key: tuple[int, str] = (i, kind)) -> None:
                x = inputs.pop(key).float()
                cos_BS = torch.nn.functional.cosine_similarity(x, x + out.float(), dim=-1)
                m = valid[0] if valid[0] is not None else torch.ones_like(cos_BS, dtype=torch.bool)
                acc = sums.setdefault(key, [0.0, 0.0])
                acc[0] += float(cos_BS[m].sum())
                acc[1] += float(m.sum())
            handles += [norm.register_forward_pre_hook(pre), sub.register_forward_hook(post)]
    was = model.training
    model.eval()
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            valid[0] = mask.bool() if mask is not None else None
            model(batch["input_ids"], attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    scores = [SublayerScore(i, k, s / max(n, 1)) for (i, k), (s, n) in sums.items()]
    return sorted(scores, key=lambda s: -s.cosine)


class DroppedSublayer(nn.Module):
    """Returns zeros of its input's shape: the residual block becomes the identity."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = [original]  # kept outside the module tree: no parameters, no state dict entries

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return torch.zeros_like(x)


class DropHandle:
    def __init__(self, dropped: list[tuple[nn.Module, str, nn.Module]], scores: list[SublayerScore]):
        self.dropped, self.scores = dropped, scores

    def restore(self) -> None:
        for block, attr, orig in self.dropped:
            setattr(block, attr, orig)
        self.dropped = []


def drop_sublayers_(model: nn.Module, n: int, batches: Iterable[dict[str, Tensor]] | None = None,
                    kind: Kind = "both", scores: list[SublayerScore] | None = None) -> DropHandle:
    """Drop the ``n`` most redundant sublayers of ``kind`` (ranked on ``batches``, or given ``scores``)."""
    blocks = _blocks(model)
    if kind not in ("attn", "mlp", "both"):
        raise ConfigError("llm_drop.kind", kind, "must be attn, mlp or both")
    limit = len(blocks) * (2 if kind == "both" else 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= limit:
        raise ConfigError("llm_drop.n", n, f"must be an integer in [0, {limit}] (the {kind} sublayers)")
    if scores is None:
        if batches is None:
            raise ConfigError("llm_drop", None, "needs calibration batches or scores")
        scores = rank_sublayers(model, batches)
    pick = [s for s in scores if kind == "both" or s.kind == kind][:n]
    dropped = []
    for s in pick:
        attr = "self_attn" if s.kind == "attn" else "mlp"
        block = blocks[s.layer]
        orig = getattr(block, attr)
        setattr(block, attr, DroppedSublayer(orig))
        dropped.append((block, attr, orig))
    return DropHandle(dropped, scores)
