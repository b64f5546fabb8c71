"""`LLM`: the offline Python API, named and shaped as vLLM's."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagoda.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from pagoda.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.entrypoints.chat_utils import Conversation, check_template_kwargs, render_chat
from pagoda.engine.input_processor import truncation_length
from pagoda.inputs import PromptType, TokensPrompt
from pagoda.logger import configure_logging
from pagoda.lora.request import LoRARequest
from pagoda.outputs import (
    ClassificationOutput, ClassificationRequestOutput, EmbeddingOutput, EmbeddingRequestOutput, RequestOutput,
    ScoringOutput, ScoringRequestOutput,
)
from pagoda.pooling import PoolerConfig, PoolingParams, check_dimensions, check_task, embedding, probabilities
from pagoda.sampling_params import SamplingParams
from pagoda.scoring import cosine_score, encode_pair, pair_indices


class LLM:
    """An engine for offline generation.

    `LLM()` loads the embedded default model (SmolLM2-135M-Instruct); `LLM(model=PATH)` a local
    Hugging Face directory, a GGUF file, or a model id already in the Hugging Face cache.
    """

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        """`engine_kwargs` are EngineConfig's fields (pagoda/config.py), named as vLLM's `LLM`
        arguments: dtype, max_model_len, max_num_seqs, gpu_memory_utilization, seed,
        tensor_parallel_size, enforce_eager, ..."""
        configure_logging()  # start-up takes seconds: say what it is doing (pagoda/logger.py)
        config = EngineConfig(model=model, **engine_kwargs)
        if config.data_parallel_size != 1:
            raise ValueError(
                f"data_parallel_size={config.data_parallel_size}: the offline LLM runs one engine; "
                "several engine cores run behind `pagoda serve --data-parallel-size N`"
            )
        self.llm_engine = LLMEngine(config)
        self._request_counter = itertools.count()

    def get_default_sampling_params(self) -> SamplingParams:
        """The sampling parameters the model's generation_config.json recommends (temperature,
        top_p, top_k, min_p, repetition_penalty, max_new_tokens as max_tokens; generation_config
        and override_generation_config as in vLLM), SamplingParams' own defaults for the rest: what
        generate and chat use without sampling_params, as vLLM's."""
        return SamplingParams(**self.llm_engine.processor.config.model.default_sampling)

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache's blocks, so that the next prompts are computed whole (as
        vLLM's); False, forgetting nothing, while requests are unfinished."""
        return self.llm_engine.engine_core.reset_prefix_cache()

    def shutdown(self) -> None:
        """Stop the engine's worker processes now (with several ranks); they also stop when the LLM
        is garbage-collected or the interpreter exits."""
        self.llm_engine.shutdown()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (a string, or {"prompt": str} or {"prompt_token_ids": [...]} with
        optionally "multi_modal_data": {"image": a PIL image or a list of them} and "cache_salt": a
        string, whose cached blocks only prompts of the same salt share); outputs in input order.
        lora_request: the LoRA adapter of every prompt, or one per prompt (None: the base model).
        priority: each prompt's, lower first (an LLM built with scheduling_policy="priority")."""
        self._require_runner("generate", "LLM.generate")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = self._params_per_prompt(sampling_params, len(prompts))
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"priority has {len(priority)} entries for {len(prompts)} prompts: give one per prompt")
        loras = _loras_per_prompt(lora_request, len(prompts))
        request_ids = self._add_all(prompts, params, loras, priority)
        return self._run(request_ids, use_tqdm)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = True,
        truncate_prompt_tokens: int | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """The embedding of each prompt (a string or {"prompt_token_ids": [...]}), in input order;
        the LLM must be an embedding engine (runner="pooling", or task="embed")."""
        pooler = self._require_pooling_task("embed", "LLM.embed")
        pooling_params = pooling_params or PoolingParams()
        check_dimensions(pooler, self.llm_engine.engine_core.model_name, pooling_params.dimensions)
        outputs = self._pool(prompts, use_tqdm, truncate_prompt_tokens)
        return [
            EmbeddingRequestOutput(
                o.request_id, EmbeddingOutput(embedding(o.pooled, pooler, pooling_params)), o.prompt_token_ids
            )
            for o in outputs
        ]

    def classify(
        self, prompts: PromptType | Sequence[PromptType], use_tqdm: bool = True,
        truncate_prompt_tokens: int | None = None, pooling_params: PoolingParams | None = None,
    ) -> list[ClassificationRequestOutput]:
        """Each prompt's label probabilities (`.outputs.probs`, by the model's label index), in
        input order (its logits with PoolingParams(use_activation=False)); the LLM must run a
        sequence-classification model (a cross-encoder)."""
        self._require_pooling_task("classify", "LLM.classify")
        use_activation = (pooling_params or PoolingParams()).use_activation
        outputs = self._pool(prompts, use_tqdm, truncate_prompt_tokens)
        return [
            ClassificationRequestOutput(
                o.request_id, ClassificationOutput(probabilities(o.pooled, use_activation)), o.prompt_token_ids
            )
            for o in outputs
        ]

    def score(
        self,
        data_1: PromptType | Sequence[PromptType],
        data_2: PromptType | Sequence[PromptType],
        /,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        pooling_params: PoolingParams | None = None,
    ) -> list[ScoringRequestOutput]:
        """vLLM's score of text pairs: data_1's one text against each of data_2's (1 to N), or
        both pairwise (N to N); one output per pair (`.outputs.score`), in order. A cross-encoder
        scores each pair as its tokenizer encodes pairs (texts only), its logit's sigmoid (the
        logit with PoolingParams(use_activation=False)); an embedding model gives the cosine
        similarity of the two texts' embeddings."""
        pooler = self._require_pooling_task("score", "LLM.score")
        texts_1 = [data_1] if isinstance(data_1, (str, dict)) else list(data_1)
        texts_2 = [data_2] if isinstance(data_2, (str, dict)) else list(data_2)
        pairs = pair_indices(len(texts_1), len(texts_2), ("data_1", "data_2"))
        if pooler.labels:  # a cross-encoder
            texts = [(texts_1[i], texts_2[j]) for i, j in pairs]
            use_activation = (pooling_params or PoolingParams()).use_activation
            return self._cross_encoder_scores(texts, truncate_prompt_tokens, use_tqdm, use_activation)
        outputs = self._pool(texts_1 + texts_2, use_tqdm, truncate_prompt_tokens)
        outputs_1, outputs_2 = outputs[: len(texts_1)], outputs[len(texts_1) :]
        return [
            ScoringRequestOutput(
                f"{a.request_id}_{b.request_id}", ScoringOutput(cosine_score(a.pooled, b.pooled)),
                a.prompt_token_ids + b.prompt_token_ids,
            )
            for a, b in ((outputs_1[i], outputs_2[j]) for i, j in pairs)
        ]

    def _cross_encoder_scores(
        self, pairs: list[tuple[PromptType, PromptType]], truncate_prompt_tokens: int | None, use_tqdm: bool,
        use_activation: bool | None,
    ) -> list[ScoringRequestOutput]:
        """Each pair through the cross-encoder, as its tokenizer encodes (and cuts) pairs."""
        tokenizer = self._require_tokenizer("LLM.score")
        max_length = truncation_length(truncate_prompt_tokens, self.llm_engine.engine_core.max_model_len)
        prompts: list[PromptType] = []
        for text_1, text_2 in pairs:
            if not (isinstance(text_1, str) and isinstance(text_2, str)):
                raise ValueError("a cross-encoder scores texts: data_1 and data_2 must be strings")
            token_ids, token_type_ids = encode_pair(tokenizer, text_1, text_2, max_length)
            prompt: TokensPrompt = {"prompt_token_ids": token_ids}
            if token_type_ids is not None:
                prompt["token_type_ids"] = token_type_ids
            prompts.append(prompt)
        return [
            ScoringRequestOutput(
                o.request_id, ScoringOutput(probabilities(o.pooled, use_activation)[0]), o.prompt_token_ids
            )
            for o in self._pool(prompts, use_tqdm)
        ]

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = True,
        tools: list[dict[str, Any]] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        chat_template_content_format: str = "auto",
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the chat template
        (which also gets `tools`, OpenAI-style function definitions, as in vLLM). A vision-language
        model's messages may hold image parts: image_url (a data: URL) or image_pil.
        continue_final_message: the last message is left open for the reply to go on with (with
        add_generation_prompt=False); chat_template_kwargs: more variables for the template, such
        as {"enable_thinking": False}; chat_template_content_format: how a message's content reaches
        the template, as vLLM's: "string" (text parts joined), "openai" (a list of parts) or "auto"
        (as the template's source shows)."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        check_template_kwargs(chat_template_kwargs)
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self._require_tokenizer("chat")
        images = self.llm_engine.processor.image_processor
        token_prompts = []
        for conv in conversations:
            conv, conv_images = images.chat_images(conv) if images is not None else (conv, [])
            text, ids = render_chat(
                tokenizer, conv, chat_template, add_generation_prompt, tools, continue_final_message,
                chat_template_kwargs, chat_template_content_format, None if images is None else images.placeholder,
            )
            token_prompts.append({"prompt": text, "prompt_token_ids": ids, "multi_modal_data": {"image": conv_images}})
        return self.generate(token_prompts, sampling_params, use_tqdm, lora_request)

    def beam_search(
        self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams, use_tqdm: bool = False
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search of each prompt (pagoda/beam_search.py): its best beam_width beams,
        best first, each with its tokens (the prompt's included), text and cum_logprob."""
        self._require_runner("generate", "LLM.beam_search")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        limit = self.llm_engine.engine_core.max_model_len
        searches = []
        for prompt in prompts:
            token_ids = self._tokenize(prompt)[1]
            if len(token_ids) + params.max_tokens > limit:
                raise ValueError(
                    f"max_tokens={params.max_tokens} is invalid: with the prompt's {len(token_ids)} tokens "
                    f"it must be at most max_model_len={limit}"
                )
            searches.append(BeamSearch(token_ids, params, self.llm_engine.processor.config.model.eos_token_ids))
        progress = tqdm(total=params.max_tokens, desc="Beam search", disable=not use_tqdm)
        while not all(search.done for search in searches):
            self._beam_step([search for search in searches if not search.done], params.step_params())
            progress.update(1)
        progress.close()
        return [self._beam_output(search) for search in searches]

    def _beam_step(self, searches: list[BeamSearch], step_params: SamplingParams) -> None:
        """Extend every live beam of these searches by one token: one engine request per beam."""
        beams = [beam for search in searches for beam in search.live]
        outputs = self._run(
            self._add_all([{"prompt_token_ids": beam.tokens} for beam in beams], [step_params] * len(beams)),
            use_tqdm=False,
        )
        start = 0
        for search in searches:
            end = start + len(search.live)
            search.advance([o.outputs[0].logprobs[0] if o.outputs[0].logprobs else None for o in outputs[start:end]])
            start = end

    def _beam_output(self, search: BeamSearch) -> BeamSearchOutput:
        best = search.best()
        tokenizer = self.llm_engine.tokenizer
        for beam in best:
            beam.text = None if tokenizer is None else tokenizer.decode(beam.tokens)
        return BeamSearchOutput(best)

    # Helpers ---------------------------------------------------------------------------------

    def _require_runner(self, runner: str, what: str) -> PoolerConfig | None:
        """The engine's pooling (None: it generates), when it is the runner `what` needs."""
        pooler = self.llm_engine.processor.config.model.pooler
        if (pooler is not None) != (runner == "pooling"):
            other = "pooling" if pooler is not None else "generate"
            raise ValueError(f"{what} needs runner={runner!r}, but this LLM was built with runner={other!r}")
        return pooler

    def _require_pooling_task(self, task: str, what: str) -> PoolerConfig:
        """The engine's pooling, when its model serves `task` (embed, classify or score)."""
        pooler = self._require_runner("pooling", what)
        assert pooler is not None  # a pooling engine
        check_task(pooler, task, self.llm_engine.engine_core.model_name)
        return pooler

    def _pool(
        self, prompts: PromptType | Sequence[PromptType], use_tqdm: bool, truncate_prompt_tokens: int | None = None
    ) -> list[RequestOutput]:
        """Each prompt's final output on the embedding engine (its pooled vector), in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        # One prefill step and no sampling: max_tokens only has to leave the prompt room.
        params = SamplingParams(max_tokens=1, truncate_prompt_tokens=truncate_prompt_tokens, detokenize=False)
        return self._run(self._add_all(prompts, [params] * len(prompts)), use_tqdm)

    def _require_tokenizer(self, what: str) -> Any:
        if self.llm_engine.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, but the LLM was built with skip_tokenizer_init=True")
        return self.llm_engine.tokenizer

    @staticmethod
    def _params_per_prompt(
        sampling_params: SamplingParams | Sequence[SamplingParams], num_prompts: int
    ) -> list[SamplingParams]:
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        if len(sampling_params) != num_prompts:
            raise ValueError(
                f"sampling_params has {len(sampling_params)} entries for {num_prompts} prompts: "
                "pass one SamplingParams or one per prompt"
            )
        return list(sampling_params)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._require_tokenizer("a text prompt").encode(prompt)
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return self._tokenize(prompt["prompt"])
        raise ValueError("a prompt must be a str, {'prompt': str} or {'prompt_token_ids': list[int]}")

    def _add_all(
        self, prompts: Sequence[PromptType], params: list[SamplingParams],
        loras: Sequence[LoRARequest | None] | None = None, priority: Sequence[int] | None = None,
    ) -> list[str]:
        """Add every prompt, or none: a bad one aborts those already added and raises."""
        engine = self.llm_engine
        request_ids: list[str] = []
        try:
            for i, (prompt, p, lora) in enumerate(zip(prompts, params, loras or [None] * len(prompts))):
                text, token_ids = self._tokenize(prompt)
                request_id = str(next(self._request_counter))
                engine.add_request(
                    request_id, token_ids, p, prompt=text, final_only=True, lora_request=lora, images=_images(prompt),
                    cache_salt=None if isinstance(prompt, str) else prompt.get("cache_salt"),
                    priority=0 if priority is None else priority[i],
                    token_type_ids=None if isinstance(prompt, str) else prompt.get("token_type_ids"),
                )
                request_ids.append(request_id)
        except ValueError:
            engine.abort_request(request_ids)
            raise
        return request_ids

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        progress = _Progress(len(request_ids)) if use_tqdm else None
        try:
            while len(finished) < len(request_ids) and engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        if progress:
                            progress.update(output)
        except BaseException:
            engine.abort_request(request_ids)
            raise
        finally:
            if progress:
                progress.close()
        return [finished[rid] for rid in request_ids]


def _images(prompt: PromptType) -> list[Any]:
    """A prompt's images: its multi_modal_data's "image", one or a list (vLLM's form)."""
    if isinstance(prompt, str):
        return []
    data = prompt.get("multi_modal_data") or {}
    unknown = sorted(set(data) - {"image"})
    if unknown:
        raise ValueError(f"multi_modal_data has {unknown}: only 'image' is supported")
    images = data.get("image", [])
    return list(images) if isinstance(images, (list, tuple)) else [images]


class _Progress:
    """vLLM's progress bar: requests done, with input and output token rates."""

    def __init__(self, total: int) -> None:
        self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
        self.start = time.perf_counter()
        self.input_tokens = 0
        self.output_tokens = 0

    def update(self, output: RequestOutput) -> None:
        self.input_tokens += len(output.prompt_token_ids)
        self.output_tokens += sum(len(c.token_ids) for c in output.outputs)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"est. speed input: {self.input_tokens / elapsed:.2f} toks/s, "
            f"output: {self.output_tokens / elapsed:.2f} toks/s",
            refresh=False,
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _loras_per_prompt(
    lora_request: LoRARequest | Sequence[LoRARequest | None] | None, num_prompts: int
) -> list[LoRARequest | None]:
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * num_prompts
    if len(lora_request) != num_prompts:
        raise ValueError(f"lora_request has {len(lora_request)} entries for {num_prompts} prompts: give one, or one per prompt")
    return list(lora_request)
