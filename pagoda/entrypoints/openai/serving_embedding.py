"""POST /v1/embeddings: one engine request per input on an embedding server (--runner pooling),
each prompt's pooled vector made its embedding (truncated to `dimensions`, normalized) as floats
or as base64 of little-endian float32s, OpenAI's two encodings."""

from __future__ import annotations

import base64

import numpy as np

from pagoda.outputs import RequestOutput
from pagoda.pooling import PoolingParams, check_dimensions, embedding
from pagoda.sampling_params import SamplingParams

from .preprocess import prompt_inputs
from .protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse
from .serving_engine import OpenAIServing, merge, new_request_id, sub_request_ids


class OpenAIServingEmbedding(OpenAIServing):
    prompt_param = "input"
    runner = "pooling"

    async def create(self, request: EmbeddingRequest) -> EmbeddingResponse:
        self.check_model(request.model)
        self.check_runner()
        pooler = self.config.pooler
        assert pooler is not None  # check_runner: a pooling server
        pooling = PoolingParams(request.dimensions, request.normalize)
        try:
            check_dimensions(pooler, self.model_name, request.dimensions)
        except ValueError as error:
            raise self.value_error(error) from None
        # One prefill step and no sampling: max_tokens only has to leave the prompt room.
        params = SamplingParams(max_tokens=1, detokenize=False)
        prompts = await prompt_inputs(
            request.input, "input", self.require_tokenizer, self.length_limit(request), request.add_special_tokens
        )
        prompts = [(text, self.truncate(request, ids)) for text, ids in prompts]
        request_id = new_request_id("embd")
        streams = await self.add_requests(request_id, prompts, [params] * len(prompts), default_param="input")
        try:
            finals: dict[int, RequestOutput] = {}
            async for index, output in merge(streams):
                finals[index] = output
        finally:
            self.engine.abort(sub_request_ids(request_id, len(prompts)))
        data = [
            EmbeddingData(index=i, embedding=_encoded(embedding(finals[i].pooled, pooler, pooling), request))
            for i in range(len(prompts))
        ]
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        return EmbeddingResponse(id=request_id, model=self.model_name, data=data, usage=self.usage(prompt_tokens, 0))


def _encoded(vector: list[float], request: EmbeddingRequest) -> list[float] | str:
    if request.encoding_format == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
