"""Request and response bodies of OpenAI's Responses API (POST /v1/responses), as pydantic models,
with the sampling extras vLLM takes there. Fields whose feature is not built are declared so
that the server can refuse them by name; of the tools, function tools are served; of `include`,
the output text's logprobs."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field

from .protocol import Int64, OpenAIModel, RequestModel, TokenId, TokenLogprob

# The one `include` value served (vLLM's too): each output_text part's logprobs, top_logprobs of them.
INCLUDE_LOGPROBS = "message.output_text.logprobs"


class InputContentPart(RequestModel):
    type: str
    text: Optional[str] = None


class InputItem(RequestModel):
    """One item of `input`: a message (the SDK's EasyInputMessage, or a message item, such as an
    earlier response's output message), a function call an earlier response made and its output,
    or another item type (a reasoning item)."""

    type: Optional[str] = None  # "message" when left out
    role: Optional[str] = None
    content: Optional[Union[str, list[InputContentPart]]] = None
    id: Optional[str] = None
    status: Optional[str] = None
    # function_call and function_call_output items
    call_id: Optional[str] = None
    name: Optional[str] = None
    arguments: Optional[str] = None
    output: Optional[Union[str, list[InputContentPart]]] = None


class ReasoningConfig(RequestModel):
    effort: Optional[str] = None
    summary: Optional[str] = None
    generate_summary: Optional[str] = None


class TextConfig(RequestModel):
    # {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "name", "schema", "strict"}
    format: Optional[dict[str, Any]] = None


class FunctionTool(RequestModel):
    """One entry of `tools`: a function, the one tool type served here."""

    type: Literal["function"]
    name: Annotated[str, Field(min_length=1)]
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema of the arguments
    strict: Optional[bool] = None


class ToolChoiceFunction(RequestModel):
    """`tool_choice` naming the one function the model must call."""

    type: Literal["function"]
    name: str


ResponsesToolChoice = Union[Literal["none", "auto", "required"], ToolChoiceFunction]


class ResponsesRequest(RequestModel):
    input: Union[str, list[InputItem]]
    model: Optional[str] = None
    instructions: Optional[str] = None
    max_output_tokens: Optional[Annotated[int, Field(ge=1, lt=2**63)]] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    previous_response_id: Optional[str] = None
    store: bool = True
    stream: bool = False
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    service_tier: Optional[str] = None
    parallel_tool_calls: bool = True
    reasoning: Optional[ReasoningConfig] = None  # effort goes to the template as reasoning_effort
    # "auto": the oldest tokens of a prompt past the context are dropped (vLLM's truncation).
    truncation: Optional[Literal["auto", "disabled"]] = "disabled"
    include: Optional[list[str]] = None
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None
    # Generated after the POST answers (needs store); GET shows it, POST .../cancel stops it.
    background: bool = False
    tools: Optional[list[FunctionTool]] = None
    tool_choice: Optional[ResponsesToolChoice] = None
    text: Optional[TextConfig] = None
    # Not built: refused when set.
    prompt: Optional[Any] = None
    max_tool_calls: Optional[int] = None
    # vLLM's extras
    top_k: Optional[Int64] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[Int64] = None
    stop: Optional[Union[str, list[str]]] = None
    ignore_eos: bool = False
    logit_bias: Optional[dict[TokenId, float]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class OutputText(OpenAIModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[TokenLogprob] = Field(default_factory=list)  # with include's INCLUDE_LOGPROBS


class OutputMessage(OpenAIModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: str
    content: list[OutputText]


class ReasoningText(OpenAIModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(OpenAIModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    status: str
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText]


class FunctionCallItem(OpenAIModel):
    """A call the model made: call_id is what the function_call_output item answering it names."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: str


OutputItem = Union[ReasoningItem, OutputMessage, FunctionCallItem]


class InputTokensDetails(OpenAIModel):
    cached_tokens: int = 0


class OutputTokensDetails(OpenAIModel):
    reasoning_tokens: int = 0


class ResponseUsage(OpenAIModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(OpenAIModel):
    reason: str


class ResponseObject(OpenAIModel):
    """A response, as POST /v1/responses answers it, GET /v1/responses/{id} returns it and the
    stream's response.* events carry it."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: Optional[ResponseUsage] = None
    incomplete_details: Optional[IncompleteDetails] = None
    error: Optional[dict[str, Any]] = None
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    previous_response_id: Optional[str] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    store: bool = True
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    reasoning: Optional[ReasoningConfig] = None
    parallel_tool_calls: bool = True
    tool_choice: ResponsesToolChoice = "auto"
    tools: list[FunctionTool] = Field(default_factory=list)
    text: TextConfig = Field(default_factory=lambda: TextConfig(format={"type": "text"}))
    truncation: str = "disabled"
    top_logprobs: Optional[int] = None
    background: bool = False


class ResponseDeleted(OpenAIModel):
    """DELETE /v1/responses/{id}'s answer, as OpenAI's."""

    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True
