"""Decoder-only MoE language model (``model: {kind: decoder_lm}``), Hugging Face Llama/Mixtral layout.

``DecoderLM(cfg)`` has ``model`` (:class:`~moesaic.models.transformer.TransformerBody`) and ``lm_head``
(tied to ``model.embed_tokens`` with ``tie_word_embeddings: true``). ``forward(input_ids,
attention_mask=None, position_ids=None, past_key_values=None, use_cache=False)`` returns a
:class:`LMOutput`; its ``.logits`` is the ``[B, S, vocab]`` tensor (``return_dict=False`` returns that
tensor directly). Presets: ``configs/mixtral_style.yaml``, ``configs/deepseekmoe_style.yaml``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from moesaic.models.base import MODELS
from moesaic.models.cache import KVCache
from moesaic.models.generation import generate
from moesaic.models.transformer import TransformerBody, TransformerConfig, init_weights
from moesaic.moe.api import collect_aux_losses, name_layers


@dataclasses.dataclass
class DecoderLMConfig(TransformerConfig):
    tie_word_embeddings: bool = False


@dataclasses.dataclass
class LMOutput:
    """``logits`` ``[B, S, V]``; ``past_key_values`` the cache (when used); ``aux_loss`` the summed weighted
    MoE aux losses of this forward (:func:`moesaic.collect_aux_losses`)."""

    logits: Tensor
    past_key_values: KVCache | None = None
    aux_loss: Tensor | None = None
    hidden_states: Tensor | None = None


@MODELS.register("decoder_lm")
class DecoderLM(nn.Module):
    """Causal decoder LM: RMSNorm, RoPE, MHA/GQA via SDPA, dense or MoE FFNs, KV-cache generation."""

    Config = DecoderLMConfig
    #: Where an imported model came from (set by ``interop.hf.from_hf`` and ``moesaic convert``).
    hf_info: dict[str, Any]

    def __init__(self, cfg: DecoderLMConfig, **kw: Any):
        super().__init__()
        self.cfg = cfg
        self.model = TransformerBody(cfg, causal=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.require_vocab(), bias=False)
        init_weights(self, cfg.init_std)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        name_layers(self)

    @property
    def max_seq_len(self) -> int:
        return self.cfg.max_seq_len

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False, return_dict: bool = True,
                cache: KVCache | None = None, output_hidden_states: bool = False, seq_ids: Tensor | None = None
                ) -> LMOutput | Tensor:
        """``seq_ids``: padding-free rows of back-to-back sequences (:func:`moesaic.train.packing.pack`)."""
        past_key_values = past_key_values if past_key_values is not None else cache
        if use_cache and past_key_values is None:
            past_key_values = KVCache()
        h_BSD = self.model(input_ids, attention_mask, position_ids, past_key_values, seq_ids)
        logits_BSV = self.lm_head(h_BSD)
        if not return_dict:
            return logits_BSV
        return LMOutput(logits_BSV, past_key_values, collect_aux_losses(self),
                        h_BSD if output_hidden_states else None)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 attention_mask: Tensor | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> Tensor:
        """Greedy (``temperature=0``) or temperature / nucleus (``top_p``, Holtzman et al. 2020) sampling
        with a KV cache. Returns ``[B, S + new]``. Left-pad batched prompts and pass ``attention_mask``."""
        return generate(self, input_ids, max_new_tokens, temperature, top_p, attention_mask, eos_token_id,
                        generator, use_cache)
