"""Beam search (LLM.beam_search, use_beam_search on /v1/completions and /v1/chat/completions) finds the same beams, with the
same scores, as transformers' generate() on tiny random models (fp32, CPU).

The transformers settings that match Pagoda's (and vLLM's) search: do_sample=False,
num_beams=beam_width, num_return_sequences=beam_width, early_stopping="never" (the search runs to
max_tokens; it stops no earlier than when no live beam can still win, so the result is the same), the
same length_penalty, and eos_token_id=None for ignore_eos. Two rules are transformers' rather than
vLLM's, so that the results agree: an EOS continuation ends a beam only when it is among the beam_width
best continuations of its step (vLLM keeps every one among a beam's 2 * beam_width candidates, so its
beam_width=1 is not greedy decoding), and the length in cum_logprob / length**length_penalty counts
the generated tokens, an ending EOS included (vLLM counts the prompt's and leaves the EOS out).
transformers runs num_beams=1 as greedy search, which has no length penalty: beam width 1 is
compared with length_penalty=0 when beams can end on EOS. ignore_eos runs with length_penalty=1 (the
default): beams of one length rank alike under any penalty.

EOS is, per model, a token the beams meet within their first few steps (so that beams do end on EOS,
at different lengths); the scores compared are the beams' cumulative logprobs, read from
transformers' sequences_scores (x length**length_penalty) and from a forward pass of the sequence."""

from __future__ import annotations

import functools
import random

import httpx
import openai
import pytest
import torch
import transformers

from pagoda import LLM, BeamSearchParams
from tests.serving import MODEL, openai_client, serving, tiny_model_args
from tests.tiny_models import save_tiny_model

ARCHS = ("llama3", "qwen3")
WIDTHS = (1, 2, 3, 4)
ABS_TOL = 1e-3  # fp32 logprobs summed over a few tokens, by two implementations


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tmp_path_factory):
    """(arch, path of a model whose EOS its beams meet, prompts, LLM on it)."""
    arch = request.param
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 256) for _ in range(n)] for n in (3, 11)]
    plain = save_tiny_model(arch, tmp_path_factory.mktemp("plain"))
    llm = LLM(model=str(plain), device="cpu", skip_tokenizer_init=True)
    first = llm.beam_search([{"prompt_token_ids": prompts[0]}], BeamSearchParams(2, 4, ignore_eos=True))[0]
    eos = first.sequences[0].tokens[len(prompts[0]) + 1]  # the best beam's second token
    llm.shutdown()
    path = save_tiny_model(arch, tmp_path_factory.mktemp("eos"), eos_token_id=eos)
    return arch, path, prompts, LLM(model=str(path), device="cpu", skip_tokenizer_init=True)


@functools.cache
def hf_model(path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_beams(path, prompt: list[int], width: int, max_new: int, length_penalty: float, eos: int | None):
    """transformers' beams, best first: (generated tokens up to and with EOS, cum logprob or None)."""
    hf = hf_model(path)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=width, num_return_sequences=width,
            early_stopping="never", length_penalty=length_penalty, max_new_tokens=max_new, eos_token_id=eos,
            pad_token_id=0, output_scores=True, return_dict_in_generate=True,
        )
    beams = []
    for i, sequence in enumerate(out.sequences):
        generated = sequence[len(prompt):].tolist()
        if eos in generated:
            generated = generated[: generated.index(eos) + 1]
        score = None if width == 1 else float(out.sequences_scores[i]) * len(generated) ** length_penalty
        beams.append((generated, score))
    return beams


def forward_cum_logprob(path, prompt: list[int], generated: list[int]) -> float:
    with torch.no_grad():
        logits = hf_model(path)(torch.tensor([prompt + generated])).logits[0]
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(generated))


def assert_same_beams(model, width: int, max_tokens: int, length_penalty: float, ignore_eos: bool) -> list:
    arch, path, prompts, llm = model
    eos = None if ignore_eos else transformers.AutoConfig.from_pretrained(path).eos_token_id
    params = BeamSearchParams(width, max_tokens, ignore_eos=ignore_eos, length_penalty=length_penalty)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, output in zip(prompts, outputs):
        expected = hf_beams(path, prompt, width, max_tokens, length_penalty, eos)
        got = [(beam.tokens[len(prompt):], beam.cum_logprob) for beam in output.sequences]
        assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected], (arch, prompt)
        for (tokens, cum), (_, hf_cum) in zip(got, expected):
            assert cum == pytest.approx(forward_cum_logprob(path, prompt, tokens), abs=ABS_TOL)
            if hf_cum is not None:
                assert cum == pytest.approx(hf_cum, abs=ABS_TOL)
            assert 1 <= len(tokens) <= max_tokens
    return outputs


@pytest.mark.parametrize("width", WIDTHS)
def test_ignore_eos_matches_transformers(model, width):
    outputs = assert_same_beams(model, width, 6, 1.0, ignore_eos=True)
    for output in outputs:  # every beam runs to max_tokens, EOS or not
        assert all(len(b.logprobs) == 6 and b.finish_reason == "length" for b in output.sequences)
        assert len(output.sequences) == width


# transformers runs num_beams=1 as greedy search, which has no length penalty.
@pytest.mark.parametrize("width, length_penalty", [(1, 0.0), (2, 1.0), (3, 2.0), (4, 0.0), (4, 1.0)])
def test_beams_ending_on_eos_match_transformers(model, width, length_penalty):
    assert_same_beams(model, width, 8, length_penalty, ignore_eos=False)


def test_eos_ends_beams_early_and_length_penalty_reorders_them(model):
    """The fixture's EOS does end beams (so the test above compares finished beams), and the length
    penalty changes which beams win."""
    _, path, prompts, llm = model
    eos = transformers.AutoConfig.from_pretrained(path).eos_token_id
    best = {
        lp: llm.beam_search([{"prompt_token_ids": prompts[0]}], BeamSearchParams(4, 8, length_penalty=lp))[0]
        for lp in (0.0, 2.0)
    }
    lengths = {lp: [len(b.tokens) - len(prompts[0]) for b in out.sequences] for lp, out in best.items()}
    assert any(b.tokens[-1] == eos and b.finish_reason == "stop" for b in best[0.0].sequences)
    assert min(lengths[0.0]) < 8
    assert [b.tokens for b in best[0.0].sequences] != [b.tokens for b in best[2.0].sequences]


def test_beam_search_params_are_validated():
    with pytest.raises(ValueError, match="^beam_width="):
        BeamSearchParams(11, 8)
    with pytest.raises(ValueError, match="^max_tokens="):
        BeamSearchParams(2, 0)
    with pytest.raises(ValueError, match="^length_penalty="):
        BeamSearchParams(2, 8, length_penalty=float("nan"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("server")
    args = tiny_model_args(directory)
    with serving(args, directory / "server.log") as (_, base):
        yield args[0], openai_client(base)


def test_completions_use_beam_search_returns_the_n_best_beams(server):
    path, client = server
    prompt = "beam search"
    response = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, n=2, best_of=3,
        extra_body={"use_beam_search": True, "length_penalty": 0.5, "ignore_eos": True},
    )
    llm = LLM(model=path, device="cpu")
    tokenizer = llm.get_tokenizer()
    expected = llm.beam_search(prompt, BeamSearchParams(3, 6, ignore_eos=True, length_penalty=0.5))[0]
    prompt_len = len(tokenizer.encode(prompt))
    assert [c.text for c in response.choices] == [tokenizer.decode(b.tokens[prompt_len:]) for b in expected.sequences[:2]]
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in response.choices)
    assert response.usage.completion_tokens == 12


def test_streamed_beam_search_sends_the_beams_text(server):
    """A streamed search sends its n best beams in one chunk, text and all (it sent them empty)."""
    _, client = server
    body = {"use_beam_search": True, "ignore_eos": True}
    whole = client.completions.create(model=MODEL, prompt="stream", max_tokens=5, n=2, extra_body=body)
    chunks = list(client.completions.create(model=MODEL, prompt="stream", max_tokens=5, n=2, stream=True, extra_body=body))
    streamed = {i: "".join(c.text for chunk in chunks for c in chunk.choices if c.index == i) for i in (0, 1)}
    assert [streamed[0], streamed[1]] == [c.text for c in whole.choices]
    assert all(c.text for c in whole.choices)


def test_chat_use_beam_search_returns_the_n_best_beams_of_the_rendered_prompt(server):
    """vLLM's chat requests take use_beam_search too (n beams, all returned): it was ignored, and
    the reply sampled."""
    path, client = server
    messages = [{"role": "user", "content": "beam search in a chat"}]
    body = {"use_beam_search": True, "ignore_eos": True, "length_penalty": 0.5}
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, n=2, extra_body=body)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, n=2, stream=True, extra_body=body,
    ))
    base = str(client.base_url).removesuffix("/").removesuffix("/v1")
    prompt = httpx.post(f"{base}/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    llm = LLM(model=path, device="cpu")
    tokenizer = llm.get_tokenizer()
    beams = llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(2, 5, ignore_eos=True, length_penalty=0.5))
    expected = [tokenizer.decode(b.tokens[len(prompt):]) for b in beams[0].sequences[:2]]
    assert [c.message.content for c in whole.choices] == expected
    streamed = ["".join(c.delta.content or "" for chunk in chunks for c in chunk.choices if c.index == i) for i in (0, 1)]
    assert streamed == expected
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, n=11, extra_body=body)
    assert caught.value.body["param"] == "n"


@pytest.mark.parametrize("extra, param", [
    ({"use_beam_search": "maybe"}, "use_beam_search"),
    ({"use_beam_search": True, "best_of": 1}, "best_of"),
    ({"use_beam_search": True, "n": 11}, "n"),
    ({"use_beam_search": True, "best_of": 11}, "best_of"),
])
def test_bad_beam_search_requests_get_400_naming_the_field(server, extra, param):
    _, client = server
    body = {"n": 2, **extra}
    n = body.pop("n")
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, n=n, extra_body=body)
    assert caught.value.body["param"] == param
    # The server goes on.
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].finish_reason
