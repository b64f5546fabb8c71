"""A request's structured-output fields (OpenAI's `response_format`, vLLM's `guided_*` extras and
`structured_outputs` object) as one StructuredOutputsParams, checked, with errors that name the
field the client sent."""

from __future__ import annotations

import asyncio
from typing import Any

from pagoda.sampling_params import StructuredOutputsParams
from pagoda.structured_output.grammar import check

from .protocol import SamplingFields
from .serving_engine import OpenAIError

# vLLM's request extras -> the StructuredOutputsParams field each sets.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


async def structured_outputs(
    request: SamplingFields, tool_schema: dict[str, Any] | None = None
) -> StructuredOutputsParams | None:
    """The request's constraint, or None; a 400 naming the field when it is malformed, cannot
    be compiled, or is given twice. tool_schema: what a "required" or named tool_choice
    constrains the output to (tool_choice.py), so that those calls are always valid. The check
    runs in a worker thread: the first imports xgrammar (and torch, seconds), and a large
    schema's grammar takes a while to build, while the event loop streams other requests."""
    given = _given(request)
    if tool_schema is not None:
        given.append(("tool_choice", {"json": tool_schema}))
    if not given:
        return None
    if len(given) > 1:
        names = [name for name, _ in given]
        raise OpenAIError(f"only one structured-output constraint may be given, not {names}", param=names[1])
    name, fields = given[0]
    try:
        params = StructuredOutputsParams(**fields)
        await asyncio.to_thread(check, params)
    except (TypeError, ValueError) as error:
        raise OpenAIError(f"{name}: {error}", param=name) from None
    return params


def _given(request: SamplingFields) -> list[tuple[str, dict[str, Any]]]:
    """(field name, StructuredOutputsParams fields) for each constraint the request sets."""
    given = [
        (name, {field: getattr(request, name)}) for name, field in _GUIDED.items() if getattr(request, name) is not None
    ]
    if request.structured_outputs is not None:
        given.append(("structured_outputs", dict(request.structured_outputs)))
    response_format = getattr(request, "response_format", None)
    if response_format is not None:
        fields = _response_format(response_format)
        if fields is not None:
            given.append(("response_format", fields))
    return given


def _response_format(response_format: dict[str, Any]) -> dict[str, Any] | None:
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise OpenAIError("response_format of type json_schema needs json_schema.schema", param="response_format")
        return {"json": spec["schema"]}
    raise OpenAIError(
        f"response_format type {kind!r} is not supported: use text, json_object or json_schema", param="response_format"
    )
