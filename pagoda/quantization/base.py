"""What every quantization format provides (the seam the models call): from the checkpoint's
`quantization_config`, the LinearMethod of each linear layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from pagoda.layers.linear import LinearMethod


class QuantizationConfig(ABC):
    name: ClassVar[str]  # the --quantization value, vLLM's spelling

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        """From the checkpoint's quantization_config dict ({} when quantizing at load)."""

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethod:
        """The method for the linear layer at module path `prefix`; UnquantizedLinearMethod() for
        layers the config leaves unquantized."""

    def check_supported(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raise ValueError naming the flag or checkpoint field and what is supported."""
