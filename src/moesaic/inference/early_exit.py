"""Early exit: a token leaves the layer stack as soon as its prediction is settled, per token.

Two criteria (``criterion``): ``confidence``, the top probability of the logits read at the current layer
(final norm + LM head) reaches ``threshold`` (CALM's softmax response: Schuster et al. 2022); and
``similarity``, MuE's saturation test (Tang et al. 2023, "You Need Multiple Exiting: Dynamic Early Exiting
for Accelerating Unified Vision Language Model"): the cosine between the hidden states of two consecutive
layers reaches ``threshold``, which needs no LM head per layer. An exited token's hidden state is frozen
and its logits are read from it; the deeper layers still compute its keys and values from the frozen state
(state propagation, as CALM), so later tokens see a complete cache. At batch 1 a decode step whose token
exited runs only the attention of the remaining layers (to fill the cache), not their MoE/FFN.

:class:`EarlyExitLM` wraps a decoder LM (``model.model`` = the Transformer body, ``model.lm_head``);
``moesaic.generate``/``complete`` and ``moesaic eval`` accept it. ``exit_stats()`` gives the mean exit
depth of the tokens seen since the last reset.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from moesaic.core.errors import ConfigError
from moesaic.inference.wrapped_lm import WrappedLM, WrappedOutput
from moesaic.models.masks import attention_mask_4d, positions_from_mask
from moesaic.models.rope import RotaryAngles


class EarlyExitLM(WrappedLM):
    def __init__(self, inner: nn.Module, threshold: float, criterion: Literal["confidence", "similarity"]
                 = "confidence", min_layer: int = 1):
        super().__init__(inner)
        body: Any = getattr(inner, "model", None)
        if not (hasattr(body, "layers") and hasattr(inner, "lm_head")):
            raise ConfigError("early_exit", type(inner).__name__, "needs a decoder LM (model.layers, lm_head)")
        n = len(body.layers)
        if not 0.0 < threshold <= 1.0:
            raise ConfigError("early_exit.threshold", threshold, "must be in (0, 1]")
        if criterion not in ("confidence", "similarity"):
            raise ConfigError("early_exit.criterion", criterion, "must be confidence or similarity")
        if not 1 <= min_layer <= n:
            raise ConfigError("early_exit.min_layer", min_layer, f"must be in [1, num_layers] = [1, {n}]")
        self.threshold, self.criterion, self.min_layer = threshold, criterion, min_layer
        self._depth_sum, self._tokens = 0.0, 0

    def exit_stats(self, reset: bool = False) -> dict[str, float]:
        n = len(self.inner.model.layers)
        out = {"mean_exit_layer": self._depth_sum / max(self._tokens, 1), "num_layers": float(n),
               "tokens": float(self._tokens)}
        if reset:
            self._depth_sum, self._tokens = 0.0, 0
        return out

    def _exits(self, h_BSD: Tensor, prev_BSD: Tensor) -> Tensor:
        if self.criterion == "similarity":
            return torch.nn.functional.cosine_similarity(h_BSD, prev_BSD, dim=-1) >= self.threshold
        p = self.inner.lm_head(self.inner.model.norm(h_BSD)).float().softmax(-1)
        return p.amax(-1) >= self.threshold

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: Any = None, **kw: Any) -> WrappedOutput:
        body, cache = self.inner.model, past_key_values
        B, S = input_ids.shape
        past = cache.seq_len if cache is not None else 0
        mask_BK = attention_mask
        if mask_BK is None and cache is not None and cache.mask is not None:
            mask_BK = torch.cat((cache.mask, torch.ones(B, S, dtype=torch.bool, device=cache.mask.device)), 1)
        if position_ids is None:
            position_ids = (positions_from_mask(mask_BK, S) if mask_BK is not None else
                            torch.arange(past, past + S, device=input_ids.device).expand(B, S))
        mask_B1QK = attention_mask_4d(mask_BK, B, S, past + S, True, input_ids.device)
        token_mask_BS = mask_BK[:, -S:].bool() if mask_BK is not None else None
        h_BSD = body.embed_tokens(input_ids)
        exited_BS = torch.zeros(B, S, dtype=torch.bool, device=input_ids.device)
        depth_BS = torch.full((B, S), len(body.layers), dtype=torch.float32, device=input_ids.device)
        last = len(body.layers) - 1
        rope = RotaryAngles(position_ids)  # the rotary angles once for all layers, as in the body
        for i, layer in enumerate(body.layers):
            if bool(exited_BS.all()):  # every token left: only the cache of this layer, from the frozen state
                if cache is not None:
                    layer.self_attn(layer.input_layernorm(h_BSD), position_ids, mask_B1QK, cache)
                continue
            new_BSD = layer(h_BSD, position_ids, mask_B1QK, cache, token_mask_BS, input_ids, rope)
            prev_BSD, h_BSD = h_BSD, torch.where(exited_BS[..., None], h_BSD, new_BSD)
            if i + 1 >= self.min_layer and i < last:
                now_BS = self._exits(h_BSD, prev_BSD) & ~exited_BS
                depth_BS = torch.where(now_BS, float(i + 1), depth_BS)
                exited_BS = exited_BS | now_BS
        if cache is not None:
            cache.advance(S, mask_BK)
        real_BS = token_mask_BS if token_mask_BS is not None else torch.ones_like(exited_BS)
        self._depth_sum += float(depth_BS[real_BS].sum())
        self._tokens += int(real_BS.sum())
        return WrappedOutput(self.inner.lm_head(body.norm(h_BSD)))
