"""POST /v1/embeddings: one engine request per input on an embedding server (--runner pooling),
each prompt's pooled vector made its embedding (truncated to `dimensions`, normalized) as floats
or as base64 of little-endian float32s, OpenAI's two encodings."""

from __future__ import annotations

import base64

import numpy as np

from pagoda.outputs import RequestOutput
from pagoda.pooling import PoolingParams, check_dimensions, embedding

from .preprocess import Prompt, prompt_inputs
from .protocol import ClassificationRequest, EmbeddingData, EmbeddingRequest, EmbeddingResponse
from .serving_engine import OpenAIServing


class OpenAIServingEmbedding(OpenAIServing):
    prompt_param = "input"
    runner = "pooling"

    async def create(self, request: EmbeddingRequest) -> EmbeddingResponse:
        self.check_model(request.model)
        pooler = self.check_pooling_task("embed")
        pooling = PoolingParams(request.dimensions, request.normalize)
        try:
            check_dimensions(pooler, self.model_name, request.dimensions)
        except ValueError as error:
            raise self.value_error(error) from None
        request_id, prompts, outputs = await pool_input(self, request, "embd")
        data = [
            EmbeddingData(index=i, embedding=_encoded(embedding(output.pooled, pooler, pooling), request))
            for i, output in enumerate(outputs)
        ]
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        return EmbeddingResponse(id=request_id, model=self.model_name, data=data, usage=self.usage(prompt_tokens, 0))


async def pool_input(
    serving: OpenAIServing, request: EmbeddingRequest | ClassificationRequest, prefix: str
) -> tuple[str, list[Prompt], list[RequestOutput]]:
    """A pooling request's `input` tokenized (a 400 naming it), truncated as it asks, and run on
    the embedding engine: the request's id (from prefix), its prompts and their final outputs."""
    prompts = await prompt_inputs(
        request.input, "input", serving.require_tokenizer, serving.length_limit(request), request.add_special_tokens
    )
    prompts = [(text, serving.truncate(request, ids)) for text, ids in prompts]
    request_id, outputs = await serving.pooled_outputs(prefix, prompts, "input")
    return request_id, prompts, outputs


def _encoded(vector: list[float], request: EmbeddingRequest) -> list[float] | str:
    if request.encoding_format == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
