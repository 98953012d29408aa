"""The checkpoint's own tokenizer (``tokenizer.json``) and chat template (rendered with Jinja, as HF does)."""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Sequence

from qwen_jax.errors import CheckpointError, QwenJaxError, read_json

Message = dict[str, Any]


class _TemplateRefused(Exception):
    """Raised by a template's ``raise_exception``: the template rejects the messages (it is not broken)."""


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
        config_path = os.path.join(folder, "tokenizer_config.json")
        config = _read_json(config_path)
        self.chat_template, self._template_source = _chat_template(folder, config)
        self.eos_token = _token_text(config.get("eos_token"), config_path, "eos_token")
        self.bos_token = _token_text(config.get("bos_token"), config_path, "bos_token")
        self.eos_token_id = self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Each special token's text and id: the tokens ``decode`` skips (Qwen's ``<|im_start|>``, ``<|endoftext|>``
        ...), so decoded text never holds them."""
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:
            # a lone surrogate (bytes decoded with surrogateescape) cannot be UTF-8 encoded: the tokenizers
            # library failed with a bare 'TextInputSequence must be str'
            if isinstance(text, str) and any("\ud800" <= c <= "\udfff" for c in text):
                raise QwenJaxError("prompt text holds a lone surrogate (undecodable bytes?); it is not valid "
                                   "Unicode text") from None
            raise

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                            tools: list | None = None) -> str:
        """Render ``messages`` ([{"role", "content"}, ...]) with the checkpoint's chat template."""
        if not self.chat_template:
            raise CheckpointError("this checkpoint has no chat template (tokenizer_config.json: chat_template)")
        _check_messages(messages)
        from jinja2.exceptions import TemplateError
        where = f"{self._template_source}: chat_template"
        try:
            template = _compile(self.chat_template)
        except TemplateError as e:
            line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
            raise CheckpointError(f"{where} is not a valid Jinja template{line}: {_first_line(e)}") from None
        try:
            return template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, tools=tools,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except _TemplateRefused as e:   # the template's own raise_exception: it rejects these messages
            raise QwenJaxError(f"{where} refused the messages: {_first_line(e)}") from None
        except (TemplateError, TypeError, ValueError) as e:
            # the messages' shape or the template's code: the same error either way, so the message names both
            raise QwenJaxError(f"{where} could not render these messages ({type(e).__name__}: {_first_line(e)}); "
                               f"check the messages' contents against what the template expects") from None


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def _token_text(token, path: str, field: str) -> str | None:
    if isinstance(token, dict):  # older configs store AddedToken dicts
        token = token.get("content")
    if token is not None and not isinstance(token, str):
        raise CheckpointError(f"{path}: {field} must be a token string, got {token!r}")
    return token


def _chat_template(folder: str, config: dict) -> tuple[str | None, str]:
    """The template text and the file it came from."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        try:
            with open(jinja, encoding="utf-8") as f:
                return f.read(), jinja
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{jinja}: not UTF-8 text ({e})") from None
    source = os.path.join(folder, "tokenizer_config.json")
    template = config.get("chat_template")
    if not template:
        source = os.path.join(folder, "chat_template.json")
        template = _read_json(source).get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{source}: chat_template must be a Jinja template string, got "
                              f"{type(template).__name__}")
    return template or None, source


def _check_messages(messages) -> None:
    shape = "a chat is a non-empty list of {'role': str, 'content': str} dicts"
    if not isinstance(messages, (list, tuple)) or not messages:
        raise QwenJaxError(f"bad chat {messages!r}: {shape}")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise QwenJaxError(f"bad chat message {m!r}: expected a dict with 'role' and 'content' ({shape})")
        if not isinstance(m["role"], str) or not (m["content"] is None or isinstance(m["content"], (str, list))):
            raise QwenJaxError(f"bad chat message {m!r}: role must be a string and content a string (a list of "
                               "content parts where the template takes them, or None for an assistant turn of "
                               "tool calls)")


_TEMPLATES: dict[str, Any] = {}


def _compile(template: str):
    if template not in _TEMPLATES:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise _TemplateRefused(message)

        def tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
            return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[template] = env.from_string(template)
    return _TEMPLATES[template]
