"""Request and response bodies of the OpenAI API (plus vLLM's sampling extras), as pydantic models.

Requests accept every field OpenAI defines; fields whose feature is not built are declared so
that the server can refuse them by name (see UNSUPPORTED_*), and unknown fields are ignored, as
OpenAI's own server and vLLM do. Sampling values are validated by SamplingParams, not here; what
the schema checks is what must hold before a request reaches the engine: integers that fit its
64 bits, token ids >= 0, OpenAI's cap on n, and text that is valid Unicode (no
lone UTF-16 surrogates, which JSON can carry but no tokenizer or msgpack takes). Responses leave
out fields that are None, but for prompt_logprobs in whole responses, which vLLM always carries."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel, ConfigDict, Field, PlainSerializer, SerializerFunctionWrapHandler, field_validator, model_serializer,
)

from pagoda.sampling_params import INT64_MAX, INT64_MIN

# Bounded by < 2**63 rather than <= 2**63 - 1: /openapi.json writes bounds as floats, and only
# the power of two is exact.
Int64 = Annotated[int, Field(ge=INT64_MIN, lt=INT64_MAX + 1)]
TokenId = Annotated[int, Field(ge=0, lt=INT64_MAX + 1)]
MAX_N = 128  # OpenAI's cap on choices per request

_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RequestModel(OpenAIModel):
    """A request body, or a part of one: every string in it must be valid Unicode."""

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        if _has_lone_surrogate(value):
            raise ValueError("the text holds a lone UTF-16 surrogate (such as \\ud800), which is not valid Unicode")
        return value


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a string in a field's value (nested lists and dicts included) is not valid Unicode;
    nested models have checked their own fields. A loop, not recursion: a JSON schema may nest
    deeper than Python's recursion limit."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item) is not None:
                return True
        elif isinstance(item, (list, tuple)):
            pending.extend(part for part in item if not isinstance(part, int))
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
    return False


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


class StreamOptions(RequestModel):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False


class SamplingFields(RequestModel):
    """Fields the completion and chat requests share."""

    model: Optional[str] = None
    n: Optional[Annotated[int, Field(ge=1, le=MAX_N)]] = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[TokenId, float]] = None  # JSON's keys are strings: "50256"
    seed: Optional[Int64] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    max_tokens: Optional[Int64] = None
    # vLLM's extras
    top_k: Optional[Int64] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Int64 = 0
    ignore_eos: bool = False
    stop_token_ids: Optional[list[TokenId]] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: Optional[Int64] = None
    allowed_token_ids: Optional[list[TokenId]] = None
    bad_words: Optional[Union[str, list[str]]] = None
    truncate_prompt_tokens: Optional[Int64] = None
    # Prompt and output token ids in the response; streamed, the prompt's come in the first chunk.
    return_token_ids: Optional[bool] = None
    # Logprob tokens as "token_id:N" (None: the server's --return-tokens-as-token-ids).
    return_tokens_as_token_ids: Optional[bool] = None
    # vLLM's structured-output extras (checked in structured_outputs.py)
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    structured_outputs: Optional[dict[str, Any]] = None
    # vLLM's: the prompt's cached blocks are shared only with requests that give the same salt.
    cache_salt: Optional[str] = None
    # vLLM's: with --scheduling-policy priority, lower runs earlier (else only 0 is taken).
    priority: Int64 = 0
    # vLLM's beam search: n beams (completions: best_of, else n), the n best returned.
    use_beam_search: bool = False
    length_penalty: float = 1.0


PromptInput = Union[str, list[str], list[TokenId], list[list[TokenId]]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    max_tokens: Optional[Int64] = 16  # OpenAI's default for completions; chat's None is the rest of the context
    best_of: Optional[Int64] = None
    echo: Optional[bool] = False
    logprobs: Optional[Int64] = None
    suffix: Optional[str] = None
    response_format: Optional[dict[str, Any]] = None  # vLLM's extra: as chat's
    add_special_tokens: bool = True  # vLLM's: the tokenizer's special tokens (BOS) around a text prompt


class ImageURL(RequestModel):
    url: Optional[str] = None  # checked with the part, so that its error names the part
    detail: Optional[str] = None


class TextPart(RequestModel):
    """A content part: text, or (for a vision-language model) an image_url."""

    type: str
    text: Optional[str] = None
    image_url: Optional[ImageURL] = None


class FunctionDefinition(RequestModel):
    name: Annotated[str, Field(min_length=1)]
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema of the arguments
    strict: Optional[bool] = None


class ChatCompletionToolParam(RequestModel):
    """One entry of `tools`."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    """`tool_choice` naming the one function the model must call."""

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class FunctionCall(RequestModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(RequestModel):
    """A call the assistant made: in a response, or in the history a request sends back."""

    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    role: str
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None
    refusal: Optional[str] = None
    audio: Optional[Any] = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    logprobs: Optional[bool] = False
    top_logprobs: Optional[Int64] = None  # -1: the whole vocabulary; bounded by --max-logprobs
    max_completion_tokens: Optional[Int64] = None
    audio: Optional[Any] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    tools: Optional[list[ChatCompletionToolParam]] = None
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict[str, Any]] = None
    modalities: Optional[list[str]] = None
    prediction: Optional[Any] = None
    web_search_options: Optional[Any] = None
    reasoning_effort: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    # vLLM's extras
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None  # extra variables for the template: enable_thinking
    documents: Optional[list[dict[str, str]]] = None  # for a retrieval-augmented template: {"title", "text"} each
    add_generation_prompt: bool = True
    # vLLM's: the tokenizer's special tokens (BOS) added to the rendered template, which has its own
    add_special_tokens: bool = False
    continue_final_message: bool = False  # the last message left open, for the model to go on with
    echo: bool = False  # the reply starts with the last message's text when that has the reply's role
    include_reasoning: bool = True  # with --reasoning-parser: false leaves reasoning_content out


class TokenizeRequest(RequestModel):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    tools: Optional[list[ChatCompletionToolParam]] = None  # rendered by the chat template with messages
    # vLLM's, as on chat completions: the request's own template (--trust-request-chat-template), its variables
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM's, as on chat completions: the last message left open
    return_token_strs: Optional[bool] = False


class DetokenizeRequest(RequestModel):
    model: Optional[str] = None
    tokens: list[TokenId]


class PromptTokenUsageInfo(OpenAIModel):
    cached_tokens: Optional[int] = None  # prompt tokens the prefix cache served


class EmbeddingRequest(RequestModel):
    """POST /v1/embeddings: OpenAI's fields, and vLLM's truncate_prompt_tokens, add_special_tokens
    and normalize."""

    model: Optional[str] = None
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[Int64] = None
    user: Optional[str] = None
    truncate_prompt_tokens: Optional[Int64] = None
    add_special_tokens: bool = True
    normalize: Optional[bool] = None


class EmbeddingData(OpenAIModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: Union[list[float], str]  # a string: base64 of little-endian float32s


class ScoreRequest(RequestModel):
    """POST /score (and /v1/score), vLLM's: text_1's one text scored against each of text_2's (1
    to N), or both pairwise (N to N)."""

    model: Optional[str] = None
    text_1: Union[str, list[str]]
    text_2: Union[str, list[str]]
    truncate_prompt_tokens: Optional[Int64] = None
    use_activation: Optional[bool] = None  # vLLM's: false gives a cross-encoder's raw logit


class RerankRequest(RequestModel):
    """POST /rerank (and /v1/rerank, /v2/rerank), vLLM's (Jina's and Cohere's shape): the documents
    by their score against the query, best first; top_n of them (0: all). return_documents: false
    leaves each result's document out (Jina's and Cohere's switch; vLLM always includes it)."""

    model: Optional[str] = None
    query: str
    documents: list[str]
    top_n: Int64 = 0
    return_documents: bool = True
    truncate_prompt_tokens: Optional[Int64] = None
    use_activation: Optional[bool] = None  # vLLM's: false gives a cross-encoder's raw logit


class ClassificationRequest(RequestModel):
    """POST /classify, vLLM's: each input's label probabilities (a sequence-classification model),
    or its logits with use_activation: false."""

    model: Optional[str] = None
    input: PromptInput
    user: Optional[str] = None
    truncate_prompt_tokens: Optional[Int64] = None
    add_special_tokens: bool = True
    use_activation: Optional[bool] = None  # vLLM's: false gives the labels' raw logits


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokenUsageInfo] = None


# A logprob as the responses carry it: -inf (a token masked out, or filtered with
# --logprobs-mode processed_*) is not JSON, so it is written floored at vLLM's -9999.0.
LogprobValue = Annotated[float, PlainSerializer(lambda value: max(value, -9999.0), return_type=float)]


class CompletionLogprobs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[LogprobValue]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, LogprobValue]]] = Field(default_factory=list)


class LogprobInfo(OpenAIModel):
    """vLLM's Logprob: one token's logprob, its rank in the vocabulary and its text."""

    logprob: LogprobValue
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# vLLM's prompt_logprobs: per prompt token (None for the first, which has no context), token id -> logprob.
PromptLogprobs = list[Optional[dict[int, LogprobInfo]]]


def _with_prompt_logprobs(data: dict[str, Any]) -> dict[str, Any]:
    """vLLM's whole responses carry prompt_logprobs, null when not asked for; clients index it."""
    data.setdefault("prompt_logprobs", None)
    return data


class CompletionStreamChoice(OpenAIModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    token_ids: Optional[list[int]] = None  # return_token_ids: the output's (a chunk's new ones)
    prompt_token_ids: Optional[list[int]] = None  # return_token_ids (streamed: in a prompt's first chunk)


class CompletionChoice(CompletionStreamChoice):
    prompt_logprobs: Optional[PromptLogprobs] = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _with_prompt_logprobs(handler(self))


class CompletionResponse(OpenAIModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class CompletionStreamResponse(CompletionResponse):
    choices: list[CompletionStreamChoice]  # type: ignore[assignment]


class TopLogprob(OpenAIModel):
    token: str
    logprob: LogprobValue
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIModel):
    content: Optional[list[TokenLogprob]] = None


class ReasoningFields(OpenAIModel):
    """A reply's thinking (--reasoning-parser), under DeepSeek's name and vLLM's newer one."""

    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None


class ChatResponseMessage(ReasoningFields):
    role: str = "assistant"
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None


class ChatChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    token_ids: Optional[list[int]] = None  # return_token_ids


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Optional[UsageInfo] = None
    prompt_logprobs: Optional[PromptLogprobs] = None
    prompt_token_ids: Optional[list[int]] = None  # return_token_ids

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _with_prompt_logprobs(handler(self))


class DeltaFunctionCall(OpenAIModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(OpenAIModel):
    """A piece of a streamed tool call: the first carries id, type and name; the next ones pieces
    of the arguments text."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None


class DeltaMessage(ReasoningFields):
    role: Optional[str] = None
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    token_ids: Optional[list[int]] = None  # return_token_ids: the chunk's new ones


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = None
    prompt_token_ids: Optional[list[int]] = None  # return_token_ids: in the first chunk


class ModelCard(OpenAIModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagoda"
    root: Optional[str] = None
    parent: Optional[str] = None  # a LoRA adapter's base model
    max_model_len: Optional[int] = None


class ModelList(OpenAIModel):
    object: str = "list"
    data: list[ModelCard]


class EmbeddingResponse(OpenAIModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo


class ScoreData(OpenAIModel):
    index: int  # the pair's
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(OpenAIModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreData]
    usage: UsageInfo


class RerankDocument(OpenAIModel):
    text: str


class RerankResult(OpenAIModel):
    index: int  # the document's, in the request
    document: Optional[RerankDocument] = None  # None: return_documents was false
    relevance_score: float


class RerankUsage(OpenAIModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(OpenAIModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class ClassificationData(OpenAIModel):
    index: int
    label: str  # the most probable label's name (config.json's id2label)
    probs: list[float]
    num_classes: int


class ClassificationResponse(OpenAIModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ClassificationData]
    usage: UsageInfo
