"""GET /tokenizer_info (--enable-tokenizer-info-endpoint): the tokenizer's configuration, as vLLM
reports it, for clients that tokenize on their side."""

from __future__ import annotations

from typing import Any

# Paths on the server's disk: of no use to a client.
_FILE_FIELDS = ("vocab_file", "merges_file")


def tokenizer_info(tokenizer: Any, chat_template: str | None) -> dict[str, Any]:
    """The tokenizer's init kwargs (made JSON), its class and the chat template the server uses."""
    config = {
        name: _json_value(value) for name, value in (getattr(tokenizer, "init_kwargs", None) or {}).items()
        if name not in _FILE_FIELDS
    }
    config["tokenizer_class"] = type(tokenizer).__name__
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        config["chat_template"] = _json_value(template)
    return config


def _json_value(value: Any) -> Any:
    """value as JSON holds it: special tokens (AddedToken) as their text, anything else unknown as str."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    content = getattr(value, "content", None)
    return content if isinstance(content, str) else str(value)
