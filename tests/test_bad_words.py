"""vLLM's bad_words: the words as token sequences (the tokenizer's, with the spaced form where it
is another token of the same length), each one's last token masked while the output ends with
the others; greedy outputs against transformers' forward with the same masking (fp32, CPU), and
the field through the server."""

from __future__ import annotations

import openai
import pytest
import torch
import transformers

from pagoda import LLM, SamplingParams
from pagoda.sample.sampler import process_logits
from pagoda.sampling_params import bad_words_token_ids
from tests.serving import MODEL, openai_client, save_tokenizer, serving, tiny_model_args
from tests.test_sampler import Req, random_logits
from tests.tiny_models import save_tiny_model

MASKED = float("-inf")


def test_a_word_is_masked_once_the_output_ends_with_its_other_tokens() -> None:
    params = SamplingParams(bad_words_token_ids=[[5], [7, 8, 9]])
    logits = random_logits(3, 16)
    requests = [Req(params, output_token_ids=out) for out in ([], [7, 8], [8, 7])]
    out = process_logits(logits, requests, [len(r.output_token_ids) for r in requests])
    masked = torch.nonzero(out == MASKED).tolist()
    assert masked == [[0, 5], [1, 5], [1, 9], [2, 5]]
    unmasked = out != MASKED
    assert torch.equal(out[unmasked], logits[unmasked])


def test_words_become_their_token_sequences_as_vllm_tokenizes_them() -> None:
    vocab = {"cat": [10], " cat": [11], "big dog": [20, 21], " big dog": [22, 21], "ox": [30], " ox": [31, 30]}
    assert bad_words_token_ids(["cat", " big dog", "ox"], vocab.__getitem__) == [[10], [11], [20, 21], [22, 21], [30]]


@pytest.mark.parametrize("words", [[""], ["  "], [3], 3])
def test_empty_or_non_text_words_are_refused_by_name(words) -> None:
    with pytest.raises(ValueError, match="^bad_words="):
        SamplingParams(bad_words=words)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad_words")
    vocab_size = save_tokenizer(directory / "llama3")
    path = save_tiny_model("llama3", directory, vocab_size=vocab_size)
    return str(path), LLM(model=str(path), device="cpu")


def reference_greedy(path: str, prompt: list[int], sequences: list[list[int]], max_tokens: int) -> list[int]:
    """transformers' forward, one token at a time, with the bad words masked over the output."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    output: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([prompt + output])).logits[0, -1]
            for word in sequences:
                if len(word) - 1 <= len(output) and output[len(output) - len(word) + 1 :] == word[:-1]:
                    logits[word[-1]] = MASKED
            output.append(int(logits.argmax()))
    return output


def test_greedy_outputs_avoid_the_words_as_transformers_does(tiny) -> None:
    path, llm = tiny
    tokenizer = llm.get_tokenizer()
    prompt = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    free = llm.generate({"prompt_token_ids": prompt}, greedy, use_tqdm=False)[0].outputs[0].token_ids
    # Words the model writes unconstrained (a random model writes bytes: printable ones make
    # words): a pair of tokens, and another token alone.
    printable = [i for i, t in enumerate(free) if _printable(tokenizer.decode([t]))]
    first = next(i for i in printable if i + 1 in printable)
    pair = free[first : first + 2]
    single = next(free[i] for i in printable if free[i] not in pair)
    words = [tokenizer.decode(pair), tokenizer.decode([single])]
    sequences = [tokenizer.encode(word, add_special_tokens=False) for word in words]
    assert sequences == [pair, [single]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=words)
    got = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
    assert got != free and single not in got
    assert got == reference_greedy(path, prompt, sequences, 24)


def _printable(text: str) -> bool:
    return len(text) == 1 and text.isascii() and text.isprintable() and not text.isspace()


def test_the_server_takes_bad_words_and_names_a_bad_one(tmp_path) -> None:
    args = tiny_model_args(tmp_path)
    with serving(args, tmp_path / "server.log") as (_, base):
        client = openai_client(base)
        free = client.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0)
        word = next(c for c in free.choices[0].text if _printable(c))
        banned = client.completions.create(
            model=MODEL, prompt="abc", max_tokens=8, temperature=0, extra_body={"bad_words": [word]}
        )
        assert word not in banned.choices[0].text
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "abc"}], max_tokens=8, temperature=0,
            extra_body={"bad_words": word},
        )
        assert word not in chat.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=MODEL, prompt="abc", max_tokens=2, extra_body={"bad_words": [" "]})
        assert caught.value.body["param"] == "bad_words"
