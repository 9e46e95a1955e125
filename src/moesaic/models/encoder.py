"""Bidirectional encoder with a classification head (``model: {kind: encoder_classifier}``).

The same blocks as the decoder without the causal mask (BERT-style, Devlin et al. 2019, with RoPE and
RMSNorm); MoE routers must accept non-causal use. The pooled representation (mean over real tokens, or
the first token) feeds a linear ``score`` head (Hugging Face's ``*ForSequenceClassification`` name).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from moesaic.core.config import rule
from moesaic.models.base import MODELS
from moesaic.models.decoder import LMOutput
from moesaic.models.transformer import TransformerBody, TransformerConfig, init_weights
from moesaic.moe.api import collect_aux_losses, name_layers


@dataclasses.dataclass
class EncoderClassifierConfig(TransformerConfig):
    task: ClassVar[str] = "classification"
    num_labels: int = rule(2, ge=1)
    pooling: Literal["mean", "first"] = "mean"


@MODELS.register("encoder_classifier")
class EncoderClassifier(nn.Module):
    """Bidirectional Transformer encoder (dense or MoE FFNs) + mean/first-token pooling + linear classifier."""

    Config = EncoderClassifierConfig

    def __init__(self, cfg: EncoderClassifierConfig, **kw: Any):
        super().__init__()
        self.cfg = cfg
        self.model = TransformerBody(cfg, causal=False)
        self.score = nn.Linear(cfg.d_model, cfg.num_labels, bias=True)
        init_weights(self, cfg.init_std)
        name_layers(self)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, return_dict: bool = True,
                seq_ids: Tensor | None = None) -> LMOutput | Tensor:
        """``seq_ids``: padding-free rows (:func:`moesaic.train.packing.pack`); the logits are then one row per
        sequence, in sequence order."""
        h_BSD = self.model(input_ids, attention_mask, seq_ids_BS=seq_ids)
        if seq_ids is not None:
            pooled_BD = self._pool_packed(h_BSD, seq_ids)
        elif self.cfg.pooling == "first":
            pooled_BD = h_BSD[:, 0]
        elif attention_mask is None:
            pooled_BD = h_BSD.mean(1)
        else:
            m_BS1 = attention_mask.to(h_BSD.dtype).unsqueeze(-1)
            pooled_BD = (h_BSD * m_BS1).sum(1) / m_BS1.sum(1).clamp_min(1.0)
        logits_BL = self.score(pooled_BD)
        if not return_dict:
            return logits_BL
        return LMOutput(logits_BL, None, collect_aux_losses(self), h_BSD)

    def _pool_packed(self, h_BSD: Tensor, seq_ids_BS: Tensor) -> Tensor:
        """``[N, D]``: each sequence's mean (or first token) over its own tokens."""
        D = h_BSD.shape[-1]
        h_TD, s_T = h_BSD.reshape(-1, D), seq_ids_BS.reshape(-1)
        keep = s_T >= 0
        h_TD, s_T = h_TD[keep], s_T[keep]
        N = int(s_T.max()) + 1
        if self.cfg.pooling == "first":
            first = torch.ones_like(s_T, dtype=torch.bool)
            first[1:] = s_T[1:] != s_T[:-1]
            out = h_TD.new_zeros(N, D)
            return out.index_copy(0, s_T[first], h_TD[first])
        sums = h_TD.new_zeros(N, D).index_add(0, s_T, h_TD)
        counts = torch.bincount(s_T, minlength=N).to(h_TD.dtype).clamp_min(1.0)
        return sums / counts[:, None]
