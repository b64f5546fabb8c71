"""vLLM's offline API beyond generate, on a tiny random model with a chat template (fp32, CPU):
LLM.chat's continue_final_message, chat_template_kwargs and chat_template_content_format,
get_default_sampling_params (the model's generation_config.json, which generate uses without
sampling_params) and the prompt types of pagoda.inputs."""

from __future__ import annotations

import json

import pytest

from pagoda import LLM, SamplingParams
from pagoda.inputs import TextPrompt, TokensPrompt
from tests.serving import PARTS_TEMPLATE, save_tokenizer
from tests.tiny_models import save_tiny_model

TEMPLATE = (
    "{% if greeting is defined %}{{ greeting }}\n{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if not loop.last or not continue_final_message %}"
    "</{{ m['role'] }}>{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llm-api")
    vocab_size = save_tokenizer(directory / "llama3")
    path = save_tiny_model("llama3", directory, vocab_size=vocab_size)
    (path / "chat_template.jinja").write_text(TEMPLATE)  # in place of tests.serving's ChatML
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.25, "top_p": 0.5, "max_new_tokens": 3}))
    return LLM(model=str(path), device="cpu", max_model_len=128)


def prompt_of(llm: LLM, messages, **kwargs) -> str:
    return llm.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False, **kwargs)[0].prompt


def test_chat_continues_the_final_message_and_passes_template_variables(llm):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    assert prompt_of(llm, messages) == "<user>hi</user><assistant>Hel</assistant><assistant>"
    continued = prompt_of(llm, messages, continue_final_message=True, add_generation_prompt=False)
    assert continued == "<user>hi</user><assistant>Hel"
    assert prompt_of(llm, messages[:1], chat_template_kwargs={"greeting": "hello"}) == "hello\n<user>hi</user><assistant>"
    with pytest.raises(ValueError, match="cannot both be true"):
        prompt_of(llm, messages, continue_final_message=True)
    with pytest.raises(ValueError, match="chat_template_kwargs may not set"):
        prompt_of(llm, messages, chat_template_kwargs={"tools": []})


def test_chat_template_content_format_gives_the_template_parts_or_a_string(llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    text = [{"role": "user", "content": "hi"}]
    # "auto": parts for a template that loops over them, the text joined for one that writes content out.
    assert prompt_of(llm, parts, chat_template=PARTS_TEMPLATE) == "<user>a|b|"
    assert prompt_of(llm, parts) == "<user>a\nb</user><assistant>"  # joined by newlines, as vLLM joins them
    assert prompt_of(llm, text, chat_template=PARTS_TEMPLATE, chat_template_content_format="openai") == "<user>hi|"
    # "string" forced: the looping template iterates over the string's 3 characters, which have no text.
    assert prompt_of(llm, parts, chat_template=PARTS_TEMPLATE, chat_template_content_format="string") == "<user>|||"
    with pytest.raises(ValueError, match="chat_template_content_format='parts' is invalid"):
        prompt_of(llm, text, chat_template_content_format="parts")


def test_the_default_sampling_params_are_the_models_generation_config(llm):
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.max_tokens) == (0.25, 0.5, 3)
    assert defaults.top_k == SamplingParams().top_k
    out = llm.generate("abc", use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3  # max_new_tokens, where SamplingParams() would give 16


def test_vllms_prompt_types_are_the_dicts_generate_takes(llm):
    text: TextPrompt = {"prompt": "abc"}
    tokens: TokensPrompt = {"prompt_token_ids": llm.get_tokenizer().encode("abc")}
    greedy = SamplingParams(temperature=0, max_tokens=4)
    a, b = llm.generate([text, tokens], greedy, use_tqdm=False)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and a.prompt_token_ids == b.prompt_token_ids
