"""Chat templates: the model's Jinja template rendered as Hugging Face's apply_chat_template does."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tandem.core.errors import ConfigError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered: the template refused them or is missing."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken mapping."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(source)
        self.special_tokens = special_tokens

    @classmethod
    def load(cls, model_dir: str, template_file: str = "") -> ChatTemplate | None:
        """The template of `template_file`, else the model's (chat_template.jinja, then
        tokenizer_config.json's `chat_template`); None when there is none."""
        config: dict[str, Any] = {}
        source = None
        if model_dir:
            config_path = Path(model_dir) / "tokenizer_config.json"
            try:
                config = json.loads(config_path.read_text()) if config_path.is_file() else {}
            except (OSError, ValueError) as e:
                raise ConfigError(f"config field 'model': cannot read {config_path} ({e})") from None
            jinja_path = Path(model_dir) / "chat_template.jinja"
            source = jinja_path.read_text() if jinja_path.is_file() else config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
            source = {t.get("name"): t.get("template") for t in source}.get("default")
        if template_file:
            try:
                source = Path(template_file).read_text()
            except OSError as e:
                raise ConfigError(f"config field 'chat_template': cannot read {template_file} ({e})") from None
        if not source:
            return None
        special = {name: text for name in SPECIAL_TOKENS if (text := _token_text(config.get(name))) is not None}
        try:
            return cls(source, special)
        except jinja2.TemplateError as e:
            raise ConfigError(f"chat template does not compile: {e}") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages`; ChatTemplateError when the template refuses them."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None
