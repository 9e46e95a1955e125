"""Base of the decoding-strategy wrappers: a module around a causal LM that forwards what generation and
evaluation read (``max_seq_len``, ``tokenizer``, ``cfg``) and returns an object with ``.logits``."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn


@dataclasses.dataclass
class WrappedOutput:
    logits: Tensor


class WrappedLM(nn.Module):
    """``inner`` is the wrapped LM; ``unwrap()`` returns it with every transform of the wrapper undone."""

    inner: Any  # a decoder LM; typed loosely: its submodules (model.layers, lm_head) are read by name

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.tokenizer = getattr(inner, "tokenizer", None)

    @property
    def max_seq_len(self) -> int | None:
        return getattr(self.inner, "max_seq_len", None)

    @property
    def run_config(self) -> Any:
        return getattr(self.inner, "run_config", None)

    def unwrap(self) -> nn.Module:
        return self.inner
