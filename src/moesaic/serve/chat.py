"""Chat messages to a prompt: the model's own chat template when its folder has one, a plain template
otherwise.

A Hugging Face folder's ``tokenizer_config.json`` may hold ``chat_template`` (a Jinja template, or a list
of named ones: ``default`` is used); it is rendered the way transformers' ``apply_chat_template`` does
(sandboxed Jinja, ``messages``, ``add_generation_prompt=True``, ``bos_token``/``eos_token``,
``raise_exception``). Without one (moesaic checkpoints, folders without a template) the plain template is::

    system: You are terse.
    user: Hello
    assistant:

one ``role: content`` line per message, then ``assistant:`` (no trailing space); docs/serve.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moesaic.serve.protocol import APIError


def load_chat_template(path: str | os.PathLike[str]) -> str | None:
    """The ``chat_template`` of ``path/tokenizer_config.json`` (or ``chat_template.jinja``), else None."""
    folder = Path(path)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        tmpl = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError):
        return None
    if isinstance(tmpl, list):
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default")
    return tmpl if isinstance(tmpl, str) else None


def plain_prompt(messages: Sequence[tuple[str, str]]) -> str:
    return "".join(f"{role}: {content}\n" for role, content in messages) + "assistant:"


class ChatFormatter:
    """``format([(role, content), ...]) -> prompt text``."""

    def __init__(self, template: str | None, bos_token: str = "", eos_token: str = ""):
        self.template_text = template
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template: Any = None
        if template is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(template)

    @property
    def kind(self) -> str:
        return "model" if self._template is not None else "plain"

    def format(self, messages: Sequence[tuple[str, str]]) -> str:
        if self._template is None:
            return plain_prompt(messages)
        from jinja2 import TemplateError

        try:
            out: str = self._template.render(messages=[{"role": r, "content": c} for r, c in messages],
                                             add_generation_prompt=True, bos_token=self.bos_token,
                                             eos_token=self.eos_token)
        except TemplateError as e:
            raise APIError(400, f"messages: the model's chat template refused them ({e})", param="messages") from None
        return out


def _raise(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)
