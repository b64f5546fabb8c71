"""The engine's LoRA limits, resolved once from --enable-lora and its companions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRAConfig:
    max_loras: int  # adapters resident on the device at once: the slots, and the most in one batch
    max_lora_rank: int  # the slots' rank: no adapter may have more
    max_cpu_loras: int  # adapters each worker keeps read on the host (>= max_loras)
