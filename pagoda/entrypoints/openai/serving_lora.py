"""LoRA adapters on the server, as vLLM serves them: --lora-modules at start-up, each listed by
/v1/models with its base model as `parent`, and, when VLLM_ALLOW_RUNTIME_LORA_UPDATING (or
PAGODA_ALLOW_RUNTIME_LORA_UPDATING) is set, POST /v1/load_lora_adapter and
/v1/unload_lora_adapter. An adapter is checked (its files, rank, targets and shapes) before it is
served: a bad one is a 400, and the server and its other adapters go on."""

from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from pagoda.engine.async_llm import AsyncLLM
from pagoda.lora.registry import ServedLoRAs, parse_lora_module

from .protocol import ModelCard
from .serving_engine import OpenAIError, ServerConfig

RUNTIME_UPDATING_ENV = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "PAGODA_ALLOW_RUNTIME_LORA_UPDATING")


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


def runtime_updating_allowed() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true") for name in RUNTIME_UPDATING_ENV)


def serve_lora_modules(engine: AsyncLLM, loras: ServedLoRAs, modules: list[str], base_model_name: str) -> None:
    """Check and register --lora-modules' adapters (ValueError: the server does not start)."""
    if modules and engine.config.lora is None:
        raise ValueError("--lora-modules needs --enable-lora")
    for text in modules:
        name, path, base = parse_lora_module(text)
        lora = loras.new_request(name, path, base or base_model_name)
        engine.processor.check_lora(lora)
        loras.add(lora)


def lora_model_cards(config: ServerConfig) -> list[ModelCard]:
    return [
        ModelCard(id=lora.lora_name, root=lora.lora_path, parent=lora.base_model_name or config.served_model_names[0],
                  max_model_len=config.max_model_len)
        for lora in config.loras.by_name.values()
    ]


def add_lora_routes(app: FastAPI, engine: AsyncLLM, config: ServerConfig, responses: dict) -> None:
    """The load and unload routes, only when runtime updating is allowed (else they do not exist)."""
    if not runtime_updating_allowed():
        return
    loras = config.loras

    @app.post("/v1/load_lora_adapter", responses=responses)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        if not body.lora_name or not body.lora_path:
            raise OpenAIError("Both 'lora_name' and 'lora_path' must be provided.", param="lora_name")
        if engine.config.lora is None:
            raise OpenAIError("this server was started without --enable-lora", param="lora_name")
        try:
            lora = loras.new_request(body.lora_name, body.lora_path, config.served_model_names[0])
            # Reading the adapter's files must not stall the event loop.
            await asyncio.to_thread(engine.processor.check_lora, lora)
        except ValueError as error:
            param = "lora_name" if "already been loaded" in str(error) else "lora_path"
            raise OpenAIError(str(error), param=param) from None
        loras.add(lora)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", responses=responses)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        try:
            loras.remove(body.lora_name)
        except KeyError:
            raise OpenAIError(f"The lora adapter '{body.lora_name}' cannot be found.", status=404,
                              param="lora_name", code="model_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
