"""Pagoda: a high-throughput, memory-efficient LLM inference and serving engine."""

import os

# torch.cuda.is_available() then asks NVML, not the CUDA runtime: a process that has initialized
# CUDA can no longer fork its rank workers (as vLLM sets it, for the same reason).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

from typing import TYPE_CHECKING, Any

from pagoda.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from pagoda.outputs import (
    ClassificationOutput, ClassificationRequestOutput, CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput,
    Logprob, RequestOutput, ScoringOutput, ScoringRequestOutput,
)
from pagoda.pooling import PoolingParams
from pagoda.sampling_params import GuidedDecodingParams, SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from pagoda.entrypoints.llm import LLM

__all__ = [
    "LLM", "SamplingParams", "StructuredOutputsParams", "GuidedDecodingParams", "RequestOutput", "CompletionOutput",
    "Logprob", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence", "PoolingParams", "EmbeddingOutput",
    "EmbeddingRequestOutput", "ClassificationOutput", "ClassificationRequestOutput", "ScoringOutput",
    "ScoringRequestOutput",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # LLM loads on first use: the engine core's process imports pagoda too, and must not import
    # the front end's tokenizer with it.
    if name == "LLM":
        from pagoda.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'pagoda' has no attribute {name!r}")
