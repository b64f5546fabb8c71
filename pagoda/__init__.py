"""Pagoda: a high-throughput, memory-efficient LLM inference and serving engine."""

import os

# torch.cuda.is_available() then asks NVML, not the CUDA runtime: a process that has initialized
# CUDA can no longer fork its rank workers (as vLLM sets it, for the same reason).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

from pagoda.entrypoints.llm import LLM
from pagoda.outputs import CompletionOutput, Logprob, RequestOutput
from pagoda.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
