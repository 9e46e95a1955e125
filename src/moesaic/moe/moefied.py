"""A dense FFN split into experts by neuron (MoEfication), with biases, and the expert scorers that pick them.

Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts": the F hidden
neurons of a trained FFN ``y = act(x W_in^T + b_in) W_out^T + b_out`` are partitioned into E groups of
``f = F / E`` neurons; expert e is the FFN restricted to its group, and the sum over all experts plus
``b_out`` is the dense FFN exactly. At inference a scorer ranks the experts per token and only the top k
run, unweighted (selected experts contribute their raw outputs, as in the dense FFN). Gated FFNs (SwiGLU,
Shazeer 2020) split the same way: neuron i is ``act(g_i x) (u_i x)`` and its down column.

Scorers (``forward(x_TD) -> scores_TE``, higher = run it):

* :class:`LinearScorer` ``x c_e^T + b_e``: MoEfication's similarity selection (``c_e`` the cluster centre
  of the normalised key vectors) and EMoE's avg-k gating (Qiu et al. 2023, "Emergent Modularity in
  Pre-trained Transformers": ``c_e, b_e`` the mean key and mean bias of the expert's neurons, so the score is
  the expert's mean pre-activation).
* :class:`MLPScorer`: MoEfication's learned selection, a small MLP trained to predict which experts matter.
* ``None`` (oracle): the exact norm of each expert's output, an upper bound that costs the dense FFN.

:class:`MoEfiedFFN` keeps the readable reference (:meth:`MoEfiedFFN.forward_reference`, a loop over
tokens) beside the fast path (tokens grouped by expert, one ``addmm`` pair per expert).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor, nn

from moesaic.core.activations import ACTIVATIONS, Activation
from moesaic.core.config import Section, rule
from moesaic.core.errors import ConversionError


@dataclasses.dataclass
class MoEfiedConfig(Section):
    """The structure of a :class:`MoEfiedFFN` (what a converted checkpoint stores to rebuild it before its
    weights are loaded): E experts of ``expert_size`` neurons, ``top_k`` run per token, the scorer kind."""

    num_experts: int = rule(1, ge=1)
    expert_size: int = rule(1, ge=1)
    top_k: int = rule(1, ge=1)
    activation: Activation = "gelu"
    gated: bool = False
    scorer: Literal["linear", "mlp", "oracle"] = "linear"
    scorer_hidden: int = rule(1, ge=1)


class LinearScorer(nn.Module):
    """``scores_TE = x_TD c_ED^T + b_E`` (similarity to cluster centres, or EMoE avg-k)."""

    def __init__(self, centres_ED: Tensor, bias_E: Tensor | None = None):
        super().__init__()
        self.centres_ED = nn.Parameter(centres_ED.clone())
        self.bias_E = nn.Parameter(bias_E.clone() if bias_E is not None else centres_ED.new_zeros(centres_ED.shape[0]))

    def forward(self, x_TD: Tensor) -> Tensor:
        return torch.addmm(self.bias_E, x_TD, self.centres_ED.t())


class MLPScorer(nn.Module):
    """``scores_TE = relu(x W_1^T + b_1) W_2^T + b_2`` (MoEfication's MLP selection)."""

    def __init__(self, d_model: int, hidden: int, num_experts: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, num_experts)

    def forward(self, x_TD: Tensor) -> Tensor:
        out: Tensor = self.fc2(torch.relu(self.fc1(x_TD)))
        return out


class MoEfiedFFN(nn.Module):
    """E experts of ``f`` neurons each, cut out of one dense FFN; ``top_k`` of them run per token.

    ``w_in_EHD`` ``[E, H, D]`` (``H = 2f`` gate rows then up rows when ``gated``, else ``f``), ``b_in_EH``,
    ``w_out_EDF`` ``[E, D, f]``, ``b_out_D`` (added once per token), ``neuron_idx_EF`` the dense neuron index
    of every expert neuron. ``scorer`` None ranks by the exact expert output norm (oracle).
    """

    def __init__(self, w_in_EHD: Tensor, b_in_EH: Tensor, w_out_EDF: Tensor, b_out_D: Tensor, *, activation: str,
                 gated: bool, top_k: int, scorer: nn.Module | None, neuron_idx_EF: Tensor | None = None):
        super().__init__()
        E, H, D = w_in_EHD.shape
        self.num_experts, self.d_model, self.expert_size = E, D, w_out_EDF.shape[-1]
        self.activation, self.gated, self.top_k = activation, gated, top_k
        self.w_in_EHD = nn.Parameter(w_in_EHD.clone())
        self.b_in_EH = nn.Parameter(b_in_EH.clone())
        self.w_out_EDF = nn.Parameter(w_out_EDF.clone())
        self.b_out_D = nn.Parameter(b_out_D.clone())
        self.scorer = scorer
        idx = neuron_idx_EF if neuron_idx_EF is not None else torch.arange(E * self.expert_size).view(E, -1)
        self.register_buffer("neuron_idx_EF", idx.clone(), persistent=True)

    @classmethod
    def from_config(cls, cfg: MoEfiedConfig, d_model: int) -> MoEfiedFFN:
        """An empty (zero) MoEfied FFN of this structure; a checkpoint's weights are loaded into it."""
        E, f = cfg.num_experts, cfg.expert_size
        H = 2 * f if cfg.gated else f
        scorer: nn.Module | None = None
        if cfg.scorer == "linear":
            scorer = LinearScorer(torch.zeros(E, d_model))
        elif cfg.scorer == "mlp":
            scorer = MLPScorer(d_model, cfg.scorer_hidden, E)
        return cls(torch.zeros(E, H, d_model), torch.zeros(E, H), torch.zeros(E, d_model, f), torch.zeros(d_model),
                   activation=cfg.activation, gated=cfg.gated, top_k=cfg.top_k, scorer=scorer)

    def config(self) -> MoEfiedConfig:
        """This module's structure (:meth:`from_config` rebuilds it)."""
        kind: Literal["linear", "mlp", "oracle"] = ("oracle" if self.scorer is None else
                                                    "mlp" if isinstance(self.scorer, MLPScorer) else "linear")
        if self.scorer is not None and kind == "linear" and not isinstance(self.scorer, LinearScorer):
            raise ConversionError(f"MoEfiedFFN: scorer {type(self.scorer).__name__} has no config to save")
        hidden = self.scorer.fc1.out_features if isinstance(self.scorer, MLPScorer) else 1
        return MoEfiedConfig(num_experts=self.num_experts, expert_size=self.expert_size, top_k=self.top_k,
                             activation=self.activation, gated=self.gated, scorer=kind,  # type: ignore[arg-type]
                             scorer_hidden=hidden)

    def _hidden(self, x_ND: Tensor, e: int) -> Tensor:
        """Expert e's activations ``[N, f]``."""
        h_NH = torch.addmm(self.b_in_EH[e], x_ND, self.w_in_EHD[e].t())
        act = ACTIVATIONS[self.activation]
        if self.gated:
            f = self.expert_size
            return act(h_NH[:, :f]) * h_NH[:, f:]
        return act(h_NH)

    def expert_output(self, x_ND: Tensor, e: int) -> Tensor:
        """Expert e's output ``[N, D]`` (without ``b_out``)."""
        return self._hidden(x_ND, e) @ self.w_out_EDF[e].t()

    def expert_norms(self, x_TD: Tensor) -> Tensor:
        """``||expert_e(x_t)||`` for every token and expert ``[T, E]`` (the oracle scores; costs the dense FFN)."""
        return torch.stack([self.expert_output(x_TD, e).norm(dim=-1) for e in range(self.num_experts)], -1)

    def scores(self, x_TD: Tensor) -> Tensor:
        return self.scorer(x_TD) if self.scorer is not None else self.expert_norms(x_TD)

    def select(self, x_TD: Tensor) -> Tensor:
        """Ids of the experts each token runs ``[T, k]``."""
        k = min(self.top_k, self.num_experts)
        return self.scores(x_TD).topk(k, dim=-1).indices

    def forward(self, x: Tensor, mask: Tensor | None = None, **ctx: Any) -> Tensor:
        """Fast path: tokens grouped by expert (a stable sort), one matmul pair per expert that has rows."""
        x_TD = x.reshape(-1, self.d_model)
        y_TD = self.b_out_D.expand_as(x_TD).clone()
        if self.top_k >= self.num_experts:
            for e in range(self.num_experts):
                y_TD = y_TD + self.expert_output(x_TD, e)
        else:
            ids_TK = self.select(x_TD)
            T, K = ids_TK.shape
            order_N = torch.argsort(ids_TK.reshape(-1), stable=True)
            tok_N = order_N // K
            counts = torch.bincount(ids_TK.reshape(-1), minlength=self.num_experts).tolist()
            x_ND = x_TD.index_select(0, tok_N)
            outs, start = [], 0
            for e, n in enumerate(counts):
                if n:
                    outs.append(self.expert_output(x_ND[start:start + n], e))
                start += n
            # Un-sort with a plain scatter (every (token, choice) slot written once), then sum the k choices:
            # no atomic index_add (slow on CPU).
            y_NKD = x_TD.new_empty(T * K, self.d_model)
            y_NKD[order_N] = torch.cat(outs)
            y_TD = y_TD + y_NKD.view(T, K, self.d_model).sum(1)
        y = y_TD.view(x.shape)
        if mask is not None:
            y = y * mask.reshape(*y.shape[:-1], 1).to(y.dtype)
        return y

    def forward_reference(self, x: Tensor) -> Tensor:
        """The readable reference: for every token, the sum of its selected experts plus ``b_out``."""
        x_TD = x.reshape(-1, self.d_model)
        ids_TK = self.select(x_TD)
        rows = []
        for t in range(x_TD.shape[0]):
            y_D = self.b_out_D.clone()
            for e in ids_TK[t].tolist():
                y_D = y_D + self.expert_output(x_TD[t:t + 1], e)[0]
            rows.append(y_D)
        return torch.stack(rows).view(x.shape)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, expert_size={self.expert_size}, top_k={self.top_k}, "
                f"activation={self.activation}, gated={self.gated}")
