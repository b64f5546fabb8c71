"""LoRARequest: which adapter a request runs with, as vLLM names it (vllm.lora.request)."""

from __future__ import annotations

import msgspec


class LoRARequest(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """An adapter: a name (what the server's `model` field picks), an id unique to the adapter
    (> 0; it keys the device slots and the prefix cache) and the folder of its PEFT files."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id={self.lora_int_id} is invalid: must be >= 1")
        if not self.lora_path:
            raise ValueError(f"LoRARequest {self.lora_name!r} has no lora_path")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path
