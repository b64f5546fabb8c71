"""LLMEngine: the synchronous front end (the offline `LLM`'s). The InputProcessor makes each
user request an EngineCoreRequest (tokenizer and EOS ids resolved once, n>1 fanned out, prompt
checked), the engine core runs it behind an EngineCoreClient (in this process: a step is a call,
nothing is encoded), and the OutputProcessor turns its token ids into RequestOutputs (text, stop
strings, n>1 gathered)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pagoda.config import EngineConfig
from pagoda.engine.core_client import InprocClient
from pagoda.engine.input_processor import InputProcessor
from pagoda.engine.output_processor import OutputProcessor
from pagoda.lora.request import LoRARequest
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams
from pagoda.spec.proposer import TokenProposer


class LLMEngine:
    def __init__(self, config: EngineConfig, proposer: TokenProposer | None = None) -> None:
        """proposer: drafts tokens that each step verifies along with the next one (None: one
        token per request a step)."""
        self.processor = InputProcessor(config)
        self.tokenizer: Any | None = self.processor.tokenizer
        self.engine_core = InprocClient(self.processor.config, proposer)
        self.output_processor = OutputProcessor(self.tokenizer)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        final_only: bool = False,
        lora_request: LoRARequest | None = None,
        images: Sequence[Any] = (),
        cache_salt: str | None = None,
        priority: int = 0,
        token_type_ids: Sequence[int] | None = None,
    ) -> None:
        """Queue a request; a ValueError leaves the engine exactly as it was. With `final_only`,
        `step` returns its output only once it has finished. cache_salt: its cached blocks are
        shared only with requests of the same salt; priority: lower runs earlier (priority scheduling);
        token_type_ids: a BERT text pair's (an embedding engine's)."""
        if request_id in self.output_processor.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.processor.make_request(
            request_id, prompt_token_ids, params, lora_request=lora_request, images=images, cache_salt=cache_salt,
            priority=priority, token_type_ids=token_type_ids,
        )
        self.engine_core.add_request(request)
        self.output_processor.add(
            request_id, prompt, request.prompt_token_ids, request.children, final_only=final_only
        )

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Stop user requests and free everything they hold; unknown ids are ignored."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        live = self.output_processor.live_children(ids)
        self.engine_core.abort_requests(live)
        self.output_processor.abort(live)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; returns the outputs of the user requests it advanced."""
        outputs, stopped = self.output_processor.process(self.engine_core.get_output())
        if stopped:  # a stop string ended them here: the core must stop them too
            self.engine_core.abort_requests(stopped)
        return outputs

    def shutdown(self) -> None:
        """Stop the core's worker processes, if it has any; the engine cannot step after this."""
        self.engine_core.shutdown()
