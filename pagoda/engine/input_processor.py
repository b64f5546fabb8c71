"""The input side of the front end: the tokenizer and the engine's ResolvedConfig (model spec, EOS
ids, every default and rule), made once for the engine core, and a vision-language model's image
processor (pagoda/multimodal/processing.py: a prompt's images preprocessed, their placeholder
tokens expanded); a user request turned into an
EngineCoreRequest (n>1 fanned out into engine requests) after the checks that need the model but
no engine state (empty prompt, token ids, logit_bias keys and allowed_token_ids outside the
vocabulary, more logprobs than --max-logprobs, bad_words without a tokenizer, a structured-output
constraint that does not parse, a LoRA adapter the engine cannot apply, an empty cache_salt, a
priority without priority scheduling, token_type_ids a model of one token type cannot take), the
prompt (and its token types) truncated to truncate_prompt_tokens, logprobs
of -1 made the vocabulary's size and bad_words made token sequences. What depends on the core's
state (the prompt's length against the KV pool) the core itself refuses."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagoda.config import EngineConfig
from pagoda.engine.messages import EngineCoreRequest, EngineRequest
from pagoda.engine.resolve_apart import resolve_apart, resolve_engine
from pagoda.lora.request import LoRARequest
from pagoda.sampling_params import INT64_MAX, INT64_MIN, SamplingParams, bad_words_token_ids
from pagoda.structured_output.grammar import check as check_structured_outputs

if TYPE_CHECKING:
    from pagoda.loader.model_resolver import ResolvedModel

logger = logging.getLogger(__name__)


class InputProcessor:
    def __init__(self, args: EngineConfig, server: bool = False) -> None:
        """Find the model, load its tokenizer and resolve the engine's configuration, once; server:
        `pagoda serve`'s, whose defaults it takes and whose front end imports no torch, so the
        configuration is resolved in a process of its own (resolve_apart.py). The modules that
        only some models and requests need (images, LoRA adapters) load when first needed."""
        started = time.perf_counter()
        if server:
            resolved, self._tokenizer, self.config = resolve_apart(args, server)
        else:
            resolved, tokenizer, self.config = resolve_engine(args, server)
            self._tokenizer = lambda: tokenizer
        logger.info("configuration loaded in %.1f s", time.perf_counter() - started)
        self.vocab_size: int = self.config.model.spec.vocab_size
        self.max_logprobs = self.vocab_size if args.max_logprobs == -1 else args.max_logprobs
        # --structured-outputs-config's disable_any_whitespace: every request's JSON compact.
        self.compact_json = bool((args.structured_outputs_config or {}).get("disable_any_whitespace"))
        self._checked_loras: set[tuple[int, str]] = set()  # (id, path) of the adapters found applicable
        # A vision-language model's image preprocessing (None: a text-only model).
        self.image_processor = _image_processor(args, resolved) if self.config.model.multimodal else None

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (None with skip_tokenizer_init). The server's arrives after its configuration,
        while the engine starts: this waits for it, and raises what loading it raised."""
        return self._tokenizer()

    def make_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        lora_request: LoRARequest | None = None, images: Sequence[Any] = (), cache_salt: str | None = None,
        priority: int = 0, token_type_ids: Sequence[int] | None = None,
    ) -> EngineCoreRequest:
        """The engine request(s) of one user request (its prompt truncated as params ask; each image
        placeholder token expanded to its image's features), or a ValueError naming what is wrong.
        token_type_ids: each prompt token's (a BERT text pair's: 0 through the first text, then 1)."""
        max_model_len = self.config.model.max_model_len
        pair_start = None  # vLLM's compressed token_type_ids: the first token of type 1
        if token_type_ids is not None:
            self._validate_token_types(list(token_type_ids), len(prompt_token_ids))
            types = truncate_prompt(list(token_type_ids), params.truncate_prompt_tokens, max_model_len)
            pair_start = types.index(1) if 1 in types else None
        prompt_token_ids = truncate_prompt(prompt_token_ids, params.truncate_prompt_tokens, max_model_len)
        image_inputs = []
        if self.image_processor is not None:  # placeholders without their images are refused too
            prompt_token_ids, image_inputs = self.image_processor.process(prompt_token_ids, list(images))
        elif images:
            raise ValueError(f"images were given, but {self.config.model.spec.architecture} takes text only")
        self._validate_prompt(prompt_token_ids)
        self._validate_token_ids("logit_bias", params.logit_bias)
        self._validate_token_ids("allowed_token_ids", params.allowed_token_ids)
        params = self._resolve_logprobs(params)
        if params.bad_words:
            params = self._with_bad_words_token_ids(params)
        if params.structured_outputs is not None:
            params = self._with_engine_structured_outputs(params)
            check_structured_outputs(params.structured_outputs)
        if lora_request is not None:
            self.check_lora(lora_request)
        if cache_salt is not None and not (isinstance(cache_salt, str) and cache_salt):
            raise ValueError(f"cache_salt={cache_salt!r} is invalid: it must be a non-empty string or None")
        self._validate_priority(priority)
        return EngineCoreRequest(
            request_id, prompt_token_ids, fan_out(request_id, params), lora_request=lora_request, images=image_inputs,
            cache_salt=cache_salt, priority=priority, pair_start=pair_start,
        )

    def _validate_token_types(self, token_type_ids: list[int], num_tokens: int) -> None:
        """One type per prompt token, zeros then ones (a text pair's), and ones only for a model
        with a second token type (BERT's type_vocab_size)."""
        zeros_then_ones = set(token_type_ids) <= {0, 1} and sorted(token_type_ids) == token_type_ids
        if len(token_type_ids) != num_tokens or not zeros_then_ones:
            raise ValueError(
                "token_type_ids=<...> is invalid: they must be one per prompt token, zeros then ones (a text pair's)"
            )
        if 1 in token_type_ids and (self.config.model.spec.hf_config.get("type_vocab_size") or 1) < 2:
            raise ValueError(
                f"token_type_ids=<...> is invalid: {self.config.model.spec.architecture} has one token type"
            )

    def _validate_priority(self, priority: int) -> None:
        if not isinstance(priority, int) or isinstance(priority, bool) or not INT64_MIN <= priority <= INT64_MAX:
            raise ValueError(f"priority={priority!r} is invalid: it must be an integer of 64 bits")
        if priority != 0 and not self.config.scheduler.priority_scheduling:
            raise ValueError(
                f"priority={priority} is invalid: requests are served first come, first served; start the engine "
                "with scheduling_policy='priority' (--scheduling-policy priority) to order them by priority"
            )

    def check_lora(self, lora_request: LoRARequest) -> None:
        """ValueError unless the engine serves adapters and this one fits the model (its files
        are read once per id and path; the workers read them again when they need them)."""
        lora = self.config.lora
        if lora is None:
            raise ValueError("lora_request is invalid: the engine was started without enable_lora (--enable-lora)")
        key = (lora_request.lora_int_id, lora_request.lora_path)
        if key not in self._checked_loras:
            from pagoda.lora.peft import check_adapter, load_peft_adapter

            check_adapter(load_peft_adapter(lora_request.lora_path, lora.max_lora_rank), self.config.model.spec)
            self._checked_loras.add(key)

    def _validate_prompt(self, prompt_token_ids: Sequence[int]) -> None:
        if len(prompt_token_ids) == 0:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are out of the vocabulary range [0, {self.vocab_size})")

    def _validate_token_ids(self, name: str, token_ids: Sequence[int] | dict[int, float] | None) -> None:
        # As vLLM: a token the model does not have is a mistake, not something to ignore.
        bad = sorted(t for t in token_ids or () if t >= self.vocab_size)
        if bad:
            raise ValueError(f"{name}=<ids {bad[:5]}> is invalid: token ids must be in the vocabulary range [0, {self.vocab_size})")

    def _with_engine_structured_outputs(self, params: SamplingParams) -> SamplingParams:
        """params with the engine's structured-output settings applied (compact JSON when set)."""
        constraint = params.structured_outputs
        if not self.compact_json or constraint.disable_any_whitespace:
            return params
        params = copy.copy(params)
        params.structured_outputs = dataclasses.replace(constraint, disable_any_whitespace=True)
        return params

    def _with_bad_words_token_ids(self, params: SamplingParams) -> SamplingParams:
        """params with the token sequences of their bad_words, as this model's tokenizer writes them."""
        if self.tokenizer is None:
            raise ValueError(
                f"bad_words={params.bad_words!r} is invalid: this engine has no tokenizer (skip_tokenizer_init)"
            )
        tokenizer = self.tokenizer
        sequences = bad_words_token_ids(params.bad_words, lambda text: tokenizer.encode(text, add_special_tokens=False))
        self._validate_token_ids("bad_words", [t for ids in sequences for t in ids])
        params = copy.copy(params)  # checked when made: not checked again
        params.bad_words_token_ids = sequences
        return params

    def _resolve_logprobs(self, params: SamplingParams) -> SamplingParams:
        """params with -1 (the whole vocabulary) as the vocabulary's size; more than max_logprobs
        is refused, as vLLM refuses it."""
        resolved = {}
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(params, name)
            count = self.vocab_size if asked == -1 else asked
            if count is not None and count > self.max_logprobs:
                raise ValueError(
                    f"{name}={asked} is invalid: it asks for {count} logprobs per token, more than the "
                    f"server's max allowed ({self.max_logprobs}, --max-logprobs)"
                )
            if asked == -1:
                resolved[name] = count
        if not resolved:
            return params
        params = copy.copy(params)  # checked when made: not checked again
        for name, count in resolved.items():
            setattr(params, name, count)
        return params


def truncate_prompt(prompt_token_ids: list[int], truncate_prompt_tokens: int | None, max_model_len: int) -> list[int]:
    """The prompt's last truncate_prompt_tokens tokens (-1: the last max_model_len), as vLLM keeps them."""
    keep = truncation_length(truncate_prompt_tokens, max_model_len)
    return prompt_token_ids if keep is None else prompt_token_ids[-keep:]


def truncation_length(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """The tokens truncate_prompt_tokens keeps (-1: max_model_len; None: no truncation);
    ValueError past max_model_len."""
    if truncate_prompt_tokens is None:
        return None
    keep = max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
    if keep > max_model_len:
        raise ValueError(
            f"truncate_prompt_tokens={truncate_prompt_tokens} is invalid: it must be at most max_model_len "
            f"({max_model_len}), or -1"
        )
    return keep


def fan_out(request_id: str, params: SamplingParams) -> list[EngineRequest]:
    """n > 1 becomes n independent engine requests; they share the prompt's cached blocks."""
    if params.n == 1:
        return [(request_id, params)]
    return [(f"{i}_{request_id}", params.for_child(i)) for i in range(params.n)]


def _image_processor(args: EngineConfig, resolved: ResolvedModel) -> Any:
    from pagoda.loader.model_loader import load_hf_config
    from pagoda.multimodal.processing import ImageProcessor, ImageSources

    return ImageProcessor(
        resolved.model_dir, load_hf_config(resolved), args.limit_mm_per_prompt,
        ImageSources(args.allow_image_url_fetch, _local_media_dir(args.allowed_local_media_path)),
        resolved.trust_remote_code,
    )


def _local_media_dir(path: str | None) -> Path | None:
    """--allowed-local-media-path as an existing folder, its links resolved (file:// URLs are checked
    against it); ValueError naming the flag otherwise."""
    if path is None:
        return None
    folder = Path(path).resolve()
    if not folder.is_dir():
        raise ValueError(f"allowed_local_media_path={path!r} is invalid: it must be an existing folder")
    return folder
