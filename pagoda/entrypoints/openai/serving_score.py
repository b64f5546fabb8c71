"""vLLM's scoring APIs beside /v1/embeddings, on an embedding server (--runner pooling): POST
/score (text pairs' scores), /rerank (documents by their score against a query, best first) and
/classify (each input's label probabilities). A cross-encoder (a sequence-classification model)
scores a pair as its tokenizer encodes pairs, the probability of its one label; an embedding model
scores it by the cosine similarity of the two texts' embeddings (pagoda/scoring.py). vLLM's
`use_activation: false` gives a cross-encoder's logits instead of their sigmoid or softmax; a
cosine similarity is the same either way."""

from __future__ import annotations

from pagoda.engine.input_processor import truncation_length
from pagoda.pooling import probabilities
from pagoda.scoring import cosine_score, pair_indices

from .preprocess import Prompt, prompt_inputs, tokenize_pair
from .protocol import (
    ClassificationData, ClassificationRequest, ClassificationResponse, RerankDocument, RerankRequest, RerankResponse,
    RerankResult, RerankUsage, ScoreData, ScoreRequest, ScoreResponse,
)
from .serving_embedding import pool_input
from .serving_engine import OpenAIServing

# A scored request's id, each pair's score, and the prompt tokens scored.
_Scores = tuple[str, list[float], int]


class OpenAIServingScore(OpenAIServing):
    runner = "pooling"

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        texts_1 = [request.text_1] if isinstance(request.text_1, str) else request.text_1
        texts_2 = [request.text_2] if isinstance(request.text_2, str) else request.text_2
        request_id, scores, tokens = await self._scores(request, texts_1, texts_2, ("text_1", "text_2"), "score")
        data = [ScoreData(index=i, score=score) for i, score in enumerate(scores)]
        return ScoreResponse(id=request_id, model=self.model_name, data=data, usage=self.usage(tokens, 0))

    async def rerank(self, request: RerankRequest) -> RerankResponse:
        request_id, scores, tokens = await self._scores(
            request, [request.query], request.documents, ("query", "documents"), "rerank"
        )
        ranked = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        if request.top_n > 0:  # vLLM's: 0 (or less) ranks every document
            ranked = ranked[: request.top_n]
        results = [
            RerankResult(
                index=i, relevance_score=scores[i],
                document=RerankDocument(text=request.documents[i]) if request.return_documents else None,
            )
            for i in ranked
        ]
        usage = RerankUsage(prompt_tokens=tokens, total_tokens=tokens)
        return RerankResponse(id=request_id, model=self.model_name, usage=usage, results=results)

    async def classify(self, request: ClassificationRequest) -> ClassificationResponse:
        self.check_model(request.model)
        labels = self.check_pooling_task("classify").labels
        request_id, prompts, outputs = await pool_input(self, request, "classify")
        data = []
        for i, output in enumerate(outputs):
            probs = probabilities(output.pooled, request.use_activation)
            label = labels[max(range(len(probs)), key=probs.__getitem__)]
            data.append(ClassificationData(index=i, label=label, probs=probs, num_classes=len(probs)))
        usage = self.usage(sum(len(ids) for _, ids in prompts), 0)
        return ClassificationResponse(id=request_id, model=self.model_name, data=data, usage=usage)

    async def _scores(
        self, request: ScoreRequest | RerankRequest, texts_1: list[str], texts_2: list[str],
        names: tuple[str, str], prefix: str,
    ) -> _Scores:
        """The score of each pair of texts_1 and texts_2 (names: their fields), paired as vLLM pairs them."""
        self.check_model(request.model)
        pooler = self.check_pooling_task("score")
        try:
            pairs = pair_indices(len(texts_1), len(texts_2), names)
        except ValueError as error:
            raise self.value_error(error, names[1]) from None
        if pooler.labels:  # a cross-encoder
            texts = [(texts_1[i], texts_2[j]) for i, j in pairs]
            return await self._cross_encoder_scores(request, texts, names, prefix)
        return await self._embedding_scores(request, texts_1, texts_2, pairs, names, prefix)

    async def _cross_encoder_scores(
        self, request: ScoreRequest | RerankRequest, pairs: list[tuple[str, str]], names: tuple[str, str],
        prefix: str,
    ) -> _Scores:
        """Each pair through the cross-encoder, encoded as its tokenizer encodes pairs (and cut as
        vLLM cuts them, by the tokenizer: a pair's [CLS] and separators stay)."""
        tokenizer = self.require_tokenizer()
        try:
            max_length = truncation_length(request.truncate_prompt_tokens, self.config.max_model_len)
        except ValueError as error:
            raise self.value_error(error) from None
        encoded = [await tokenize_pair(tokenizer, text_1, text_2, max_length) for text_1, text_2 in pairs]
        prompts: list[Prompt] = [(None, ids) for ids, _ in encoded]
        request_id, outputs = await self.pooled_outputs(prefix, prompts, names[1], [types for _, types in encoded])
        scores = [probabilities(o.pooled, request.use_activation)[0] for o in outputs]
        return request_id, scores, sum(len(ids) for _, ids in prompts)

    async def _embedding_scores(
        self, request: ScoreRequest | RerankRequest, texts_1: list[str], texts_2: list[str],
        pairs: list[tuple[int, int]], names: tuple[str, str], prefix: str,
    ) -> _Scores:
        """Each text embedded once (as /v1/embeddings embeds it), each pair scored by its two embeddings' cosine."""
        prompts: list[Prompt] = []
        for texts, name in zip((texts_1, texts_2), names):
            tokenized = await prompt_inputs(texts, name, self.require_tokenizer, self.length_limit(request))
            prompts += [(text, self.truncate(request, ids)) for text, ids in tokenized]
        request_id, outputs = await self.pooled_outputs(prefix, prompts, names[1])
        outputs_1, outputs_2 = outputs[: len(texts_1)], outputs[len(texts_1) :]
        scores = [cosine_score(outputs_1[i].pooled, outputs_2[j].pooled) for i, j in pairs]
        tokens = sum(len(outputs_1[i].prompt_token_ids) + len(outputs_2[j].prompt_token_ids) for i, j in pairs)
        return request_id, scores, tokens
