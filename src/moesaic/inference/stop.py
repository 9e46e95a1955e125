"""Stop strings over a token stream, with OpenAI semantics: the completion ends before the first stop string
and the stop string is never returned or streamed.

``StopTextStream(tokenizer, stop).push(token_id) -> (text_delta, hit)``: the text is decoded from all
tokens so far (byte-level BPE tokens need not end on a character boundary, so deltas of single tokens are
not decoded alone); text that could still be the beginning of a stop string is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class StopTextStream:
    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""        # the completion text so far, cut before a stop string once one is hit
        self._emitted = 0     # characters of ``text`` already handed out
        self.hit = False

    def _held(self, text: str) -> int:
        """How many trailing characters of ``text`` could start a stop string."""
        keep = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        return keep

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns the newly safe text and whether a stop string ended the completion."""
        if self.hit:
            return "", True
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return "", False
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.hit = text[:cut], True
        else:
            self.text = text
        safe = len(self.text) if self.hit else len(self.text) - self._held(self.text)
        delta = self.text[self._emitted:safe] if safe > self._emitted else ""
        self._emitted = max(self._emitted, safe)
        return delta, self.hit

    def flush(self) -> str:
        """The held-back text at the end of a completion that hit no stop string."""
        if not self.hit:
            self.text = self.tokenizer.decode(self.ids)
        delta = self.text[self._emitted:]
        self._emitted = len(self.text)
        return delta
