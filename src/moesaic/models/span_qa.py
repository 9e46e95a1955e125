"""Extractive question answering (``model: {kind: span_qa}``): a BERT-family encoder, dense or with MoE FFNs,
and a start/end head over the passage tokens (SQuAD's span prediction, Devlin et al. 2019, section 4.2).

Robust QA with switch FFNs: DistilBERT/BERT whose FFNs are Switch Transformer layers (Fedus et al. 2021, top-1
routing, ``router: {kind: switch}``), started from the pretrained dense encoder (``pretrained``, upcycled into
the experts by ``moesaic train``; :class:`moesaic.models.sentence.BertMoEConfig`). The head is Hugging Face's
``qa_outputs`` (``Linear(D, 2)``). ``logits`` are ``[B, 2, S]`` (start, end); positions that cannot hold the
answer (the question: ``token_type_ids == 0``, and padding) get ``-1e4``. docs/zoo.md, "Extractive QA".
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from moesaic.models.base import MODELS
from moesaic.models.sentence import BertMoE, BertMoEConfig

#: Logit of positions outside the passage (finite, so that fp16/bf16 and the loss stay finite).
MASKED = -1e4


@dataclasses.dataclass
class SpanQAConfig(BertMoEConfig):
    task: ClassVar[str] = "span_qa"


@dataclasses.dataclass
class SpanOutput:
    """``logits`` ``[B, 2, S]``: start and end scores; ``last_hidden_state`` ``[B, S, D]``."""

    logits: Tensor
    last_hidden_state: Tensor


@MODELS.register("span_qa")
class SpanQA(BertMoE):
    """BERT-family encoder (dense or MoE FFNs, e.g. switch) + start/end span head over the passage tokens."""

    Config = SpanQAConfig
    cfg: SpanQAConfig

    def __init__(self, cfg: SpanQAConfig, **kw: Any):
        super().__init__(cfg)
        self.qa_outputs = nn.Linear(cfg.d_model, 2)
        nn.init.normal_(self.qa_outputs.weight, std=cfg.init_std)
        nn.init.zeros_(self.qa_outputs.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None, return_dict: bool = True,
                **ctx: Any) -> Any:
        """Without ``token_type_ids`` every real token may be in the answer."""
        h_BSD = self.hidden(input_ids, attention_mask, token_type_ids, position_ids, ctx)
        logits_BS2 = self.qa_outputs(h_BSD)
        allowed_BS = torch.ones_like(input_ids, dtype=torch.bool)
        if token_type_ids is not None:
            allowed_BS &= token_type_ids.bool()
        if attention_mask is not None:
            allowed_BS &= attention_mask.bool()
        logits_B2S = logits_BS2.transpose(1, 2).masked_fill(~allowed_BS[:, None, :], MASKED)
        if not return_dict:
            return logits_B2S
        return SpanOutput(logits_B2S, h_BSD)
