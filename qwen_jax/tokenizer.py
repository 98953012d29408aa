"""The checkpoint's own tokenizer (``tokenizer.json``) and chat template (rendered with Jinja, as HF does)."""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Sequence

from qwen_jax.errors import CheckpointError

Message = dict[str, Any]


class Tokenizer:
    """Encode / decode with ``tokenizers`` and render chat prompts with the checkpoint's template."""

    def __init__(self, folder: str):
        import tokenizers

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder}: no tokenizer.json (text prompts need the checkpoint's tokenizer)")
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from None
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        self.chat_template = _chat_template(folder, config)
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token_id = self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                            tools: list | None = None) -> str:
        """Render ``messages`` ([{"role", "content"}, ...]) with the checkpoint's chat template."""
        if not self.chat_template:
            raise CheckpointError("this checkpoint has no chat template (tokenizer_config.json: chat_template)")
        _check_messages(messages)
        return _compile(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, tools=tools,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_text(token) -> str | None:
    if isinstance(token, dict):  # older configs store AddedToken dicts
        return token.get("content")
    return token


def _chat_template(folder: str, config: dict) -> str | None:
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja) as f:
            return f.read()
    template = config.get("chat_template") or _read_json(os.path.join(folder, "chat_template.json")).get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise CheckpointError("chat messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise CheckpointError(f"bad chat message {m!r}: expected a dict with 'role' and 'content'")


_TEMPLATES: dict[str, Any] = {}


def _compile(template: str):
    if template not in _TEMPLATES:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
            return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[template] = env.from_string(template)
    return _TEMPLATES[template]
