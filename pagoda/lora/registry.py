"""The adapters a server serves by name (--lora-modules, and those loaded at run time): each
name is a LoRARequest with an id of its own, never reused, so that a name loaded again after an
unload never meets the old adapter's cached blocks or device slot."""

from __future__ import annotations

import itertools
import json

from pagoda.lora.request import LoRARequest


class ServedLoRAs:
    def __init__(self) -> None:
        self.by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)

    def get(self, name: str) -> LoRARequest | None:
        return self.by_name.get(name)

    def new_request(self, name: str, path: str, base_model_name: str | None = None) -> LoRARequest:
        """The request an adapter would be served as; `add` it once the engine has checked it."""
        if name in self.by_name:
            raise ValueError(f"The lora adapter '{name}' has already been loaded.")
        return LoRARequest(name, next(self._ids), path, base_model_name)

    def add(self, lora: LoRARequest) -> None:
        self.by_name[lora.lora_name] = lora

    def remove(self, name: str) -> None:
        """KeyError when no adapter has the name."""
        del self.by_name[name]


def parse_lora_module(text: str) -> tuple[str, str, str | None]:
    """One --lora-modules value: name=path, or vLLM's JSON form {"name", "path", "base_model_name"}
    -> (name, path, base model name or None)."""
    if text.lstrip().startswith("{"):
        try:
            module = json.loads(text)
            name, path = module["name"], module["path"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"--lora-modules {text!r}: the JSON form needs \"name\" and \"path\" ({error})") from None
        return name, path, module.get("base_model_name")
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules {text!r}: expected name=path or a JSON object")
    return name, path, None
