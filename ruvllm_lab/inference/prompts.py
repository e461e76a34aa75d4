"""Prompt building: a chat template for instruct tiers, a Q/A completion frame for base tiers.

Two formats (`models.TierSpec.prompt_format`):

* ``"chat"``: the model's own Jinja chat template (read from the GGUF header, key
  ``tokenizer.chat_template``), rendered the way Hugging Face renders it
  (sandboxed Jinja, ``trim_blocks``/``lstrip_blocks``, ``add_generation_prompt=True``).
* ``"completion"``: a base model (Gemma 3 270M) continues text, so the conversation is
  framed as ``"Question: …\\nAnswer:"`` lines and generation stops at the next
  ``"\\nQuestion:"`` or a blank line (`COMPLETION_STOP`).

A prompt is either a plain string (one user message) or a list of messages
``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

ROLES = ("system", "user", "assistant")
COMPLETION_STOP = ["\nQuestion:", "\n\n"]


def normalize_messages(prompt: str | list[dict]) -> list[dict]:
    """A string becomes one user message; a message list is checked and copied."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("prompt is empty")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"prompt must be a non-empty string or a non-empty list of messages, got {type(prompt).__name__}")
    messages = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; allowed roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def render_completion(messages: list[dict]) -> str:
    """Frame a conversation for a base model::

        <system text>\\n\\n            (when there is a system message)
        Question: <user>\\nAnswer: <assistant>\\n
        ...
        Question: <last user>\\nAnswer:
    """
    parts: list[str] = []
    for m in messages:
        content = m["content"].strip()
        if m["role"] == "system":
            parts.append(content + "\n\n")
        elif m["role"] == "user":
            parts.append(f"Question: {content}\nAnswer:")
        else:  # assistant: completes the open "Answer:"
            if not parts or not parts[-1].endswith("Answer:"):
                parts.append("Answer:")
            parts[-1] += f" {content}\n"
    if not parts or not parts[-1].endswith("Answer:"):
        parts.append("Answer:")
    return "".join(parts)


class ChatTemplate:
    """A compiled Jinja chat template, rendered as transformers' `apply_chat_template` does."""

    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = template
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = env.from_string(template)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token, **extra)


def build_prompt(messages: list[dict], prompt_format: str, template: ChatTemplate | None) -> tuple[str, list[str]]:
    """(prompt text, format stop sequences).  A chat tier without a template falls back to completion."""
    if prompt_format == "chat" and template is not None:
        text = template.render(messages)
        # the tokenizer adds BOS itself when the model wants one; don't double it
        if template.bos_token and text.startswith(template.bos_token):
            text = text[len(template.bos_token):]
        return text, []
    return render_completion(messages), list(COMPLETION_STOP)
