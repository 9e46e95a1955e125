"""Hash layers (Roller et al. 2021, "Hash Layers For Large Sparse Models"; reference code
facebookresearch/ParlAI ``projects/params_vs_compute/hash_ladder``).

Each vocabulary id is tied to one expert by a fixed table chosen before training; the layer routes the
*input token id* (``token_ids`` context, ``[B, S]`` or ``[T]``), even in deep layers. Weight 1, no gate,
no router parameter, no aux loss. Variants: ``random`` (the released code's seeded uniform table; the
default) and ``balanced`` (tokens sorted by corpus frequency, each greedily put in the least-loaded
bucket; :meth:`HashRouter.fit_balanced` builds it from a corpus of ids, before fitting all frequencies
count as equal, which gives ``id % E``) and ``bigram`` (the random table indexed by
``(prev_id * 1000003 + id) mod vocab_size``, ``prev_id`` the previous real token of the same sequence,
-1 for the first). Ids outside ``[0, vocab_size)`` map through ``id mod vocab_size`` rather than
raising, so a tokenizer with extra special ids still routes. Padding is masked by the layer (the mask
keeps it out of every expert). The table is a persistent buffer, so it is saved and restored with the
model.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any, Literal

import torch
from torch import Tensor

from moesaic.core.config import rule
from moesaic.core.errors import RoutingInputError
from moesaic.core.types import RoutingDecision
from moesaic.moe.routing.base import ROUTERS, Router, RouterConfig


@dataclasses.dataclass
class HashRouterConfig(RouterConfig):
    """``vocab_size`` ids are hashed; ``seed`` fixes the random table. The layer's ``top_k`` must be 1."""

    variant: Literal["random", "balanced", "bigram"] = "random"
    vocab_size: int = rule(32000, ge=1)
    seed: int = 0
    aux_loss_coef: float = 0.0


def balanced_table(counts_V: Tensor, num_experts: int) -> Tensor:
    """Greedy balanced assignment: ids by descending frequency (ties: lower id), each to the bucket with
    the lowest load so far (ties: lower bucket). Bucket loads then differ by at most the largest count."""
    order = torch.sort(counts_V.to(torch.float64), descending=True, stable=True).indices.tolist()
    counts = counts_V.tolist()
    table = [0] * len(counts)
    load = [0.0] * num_experts
    heap = [(0.0, e) for e in range(num_experts)]
    for v in order:
        lo, e = heapq.heappop(heap)
        table[v] = e
        load[e] = lo + counts[v]
        heapq.heappush(heap, (load[e], e))
    return torch.tensor(table, dtype=torch.long)


def bigram_keys(ids_T: Tensor, seq_ids_T: Tensor | None) -> Tensor:
    """``prev * 1000003 + id`` with ``prev`` the previous row's id in the same sequence (-1 for the first)."""
    ids_T = ids_T.long()
    prev_T = torch.roll(ids_T, 1)
    same_T = torch.ones_like(ids_T, dtype=torch.bool)
    if seq_ids_T is not None:
        seq_T = seq_ids_T.to(ids_T.device)
        same_T = seq_T == torch.roll(seq_T, 1)
    if same_T.numel():
        same_T[0] = False
    return torch.where(same_T, prev_T, -1) * 1000003 + ids_T


@ROUTERS.register("hash")
class HashRouter(Router):
    """Hash layers: a fixed vocabulary-to-expert table on the input token ids (Roller et al. 2021)."""

    Config = HashRouterConfig
    cfg: HashRouterConfig
    table_V: Tensor
    has_weight = False
    required_top_k = 1

    def __init__(self, cfg: HashRouterConfig, d_model: int, num_experts: int, top_k: int, **kw: Any):
        super().__init__(cfg, d_model, num_experts, top_k, **kw)
        if cfg.variant in ("random", "bigram"):
            gen = torch.Generator().manual_seed(cfg.seed)
            table_V = torch.randint(num_experts, (cfg.vocab_size,), generator=gen)
        else:
            table_V = balanced_table(torch.ones(cfg.vocab_size), num_experts)
        self.register_buffer("table_V", table_V, persistent=True)

    @classmethod
    def example_ctx(cls, num_tokens: int, device: torch.device | str = "cpu") -> dict[str, Any]:
        return {"token_ids": torch.randint(0, 1000, (num_tokens,), device=device)}

    @torch.no_grad()
    def fit_balanced(self, corpus_ids: Tensor) -> Tensor:
        """Rebuild the table from a corpus of ids (balanced variant); returns the bucket loads ``[E]``."""
        ids = corpus_ids.reshape(-1).long().remainder(self.cfg.vocab_size).cpu()
        counts_V = torch.bincount(ids, minlength=self.cfg.vocab_size)
        self.table_V.copy_(balanced_table(counts_V, self.num_experts).to(self.table_V.device))
        return torch.bincount(self.table_V.cpu()[ids], minlength=self.num_experts)

    def expert_of(self, token_ids: Tensor) -> Tensor:
        """Expert of each id (OOV and negative ids: ``id mod vocab_size``)."""
        return self.table_V[token_ids.long().remainder(self.cfg.vocab_size)]

    def route(self, x_TD: Tensor, token_ids: Tensor | None = None, seq_ids_T: Tensor | None = None,
              **ctx: Any) -> RoutingDecision:
        T = x_TD.shape[0]
        if token_ids is None:
            raise RoutingInputError(f"{self.layer_name}: hash routing needs token_ids (the input ids, [B, S] "
                                    "or [T]) passed to the MoE layer as a keyword")
        ids_T = token_ids.reshape(-1).to(x_TD.device)
        if ids_T.numel() != T:
            raise RoutingInputError(f"{self.layer_name}: token_ids has {ids_T.numel()} ids for {T} tokens")
        if self.cfg.variant == "bigram":
            ids_T = bigram_keys(ids_T, seq_ids_T)
        ids_TK = self.expert_of(ids_T)[:, None]
        w_TK = torch.ones(T, 1, dtype=x_TD.dtype if x_TD.dtype == torch.float64 else torch.float32,
                          device=x_TD.device)
        return RoutingDecision.from_topk(ids_TK, w_TK, self.num_experts)
