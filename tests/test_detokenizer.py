from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pagoda.engine.detokenizer import IncrementalDetokenizer, decode_token
from pagoda.sampling_params import SamplingParams

CORPUS = [
    "Hello world, this is a test of the tokenizer.",
    "Café résumé naïve façade über Straße señor",
    "你好世界，今天天气很好。中文字符测试",
    "emoji 😀 🎉 🚀 👍🏽 and more text",
    "The quick brown fox jumps over the lazy dog.\nNew lines too.",
] * 10
SPECIALS = ["<unk>", "<s>", "</s>"]
# Characters the training corpus has, and some it lacks (they fall back to bytes).
ALPHABET = "abcdefghij olrw,.\nÉéüßñ你好世界中文😀🎉🚀👍🏽ḁ𝔘Ωק€"


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style: bytes mapped to printable characters, leading spaces as 'Ġ'."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """Llama / sentencepiece style: '▁' for spaces, unknown characters as <0xXX> byte tokens."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, limit_alphabet=40, show_progress=False)
    learner.train_from_iterator(CORPUS, trainer)
    learned = json.loads(learner.to_str())["model"]
    pieces = [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if t not in SPECIALS]
    vocab = {t: i for i, t in enumerate(SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = metaspace
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


class SlowTokenizer:
    """A tokenizer without a tokenizers backend: only encode and decode (the fallback path)."""

    def __init__(self, fast: PreTrainedTokenizerFast) -> None:
        self._fast = fast

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._fast.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._fast.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._fast.convert_tokens_to_ids(token)

    def __len__(self) -> int:
        return len(self._fast)


TOKENIZERS: dict[str, Callable[[], Any]] = {
    "byte_level": byte_level_tokenizer,
    "byte_fallback": byte_fallback_tokenizer,
    "byte_fallback_slow": lambda: SlowTokenizer(byte_fallback_tokenizer()),
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tok(request: pytest.FixtureRequest) -> Any:
    return TOKENIZERS[request.param]()


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    return byte_level_tokenizer()


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(
    tokenizer: Any, prompt: list[int], output: list[int], **params: Any
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed output tokens one at a time as the engine does, taking a delta after each,
    until a stop string matches. Returns the detokenizer, the deltas and the stop string."""
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(max_tokens=None, **params))
    deltas: list[str] = []
    stop = None
    for count, token_id in enumerate(output, start=1):
        stop = detok.append([token_id], count)
        deltas.append(detok.take_delta(finished=stop is not None or count == len(output)))
        if stop is not None:
            break
    return detok, deltas, stop


def text_after(tokenizer: Any, prompt: list[int], output: list[int], skip_special_tokens: bool = True) -> str:
    """The text the output adds to the prompt, by decoding everything at once."""
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # A character the prompt ends inside of belongs to the output that completes it.
    whole = len(prompt)
    while decode(prompt[:whole]).endswith("\ufffd"):
        whole -= 1
    full, before = decode(prompt + output), decode(prompt[:whole])
    assert full.startswith(before)
    return full[len(before) :]


# Incremental text equals the full decode -----------------------------------------------------

PROMPTS = ["<s>", "Say", "你好", "x 🚀", "über\n"]


@settings(max_examples=40, deadline=None)
@given(prompt=st.sampled_from(PROMPTS), text=st.text(alphabet=ALPHABET, min_size=1, max_size=40))
def test_incremental_text_equals_full_decode(tok: Any, prompt: str, text: str) -> None:
    prompt_ids = [tok.convert_tokens_to_ids("<s>")] if prompt == "<s>" else encode(tok, prompt)
    output_ids = encode(tok, text)
    detok, deltas, _ = stream(tok, prompt_ids, output_ids)
    assert "".join(deltas) == detok.output_text == text_after(tok, prompt_ids, output_ids)
    assert not any("\ufffd" in delta for delta in deltas)


def test_characters_split_across_tokens_come_out_whole(tok: Any) -> None:
    ids = encode(tok, "ab 𝔘ḁ🚀 x")
    assert len(ids) > 8  # the rare characters are made of several byte tokens
    detok, deltas, _ = stream(tok, [], ids)
    assert detok.output_text == "ab 𝔘ḁ🚀 x"
    assert all(delta == "" or "\ufffd" not in delta for delta in deltas)
    assert deltas.count("") >= 3  # held back while a character was incomplete


def test_prompt_ending_inside_a_character(tok: Any) -> None:
    ids = encode(tok, "go 𝔘🚀 end")
    for cut in range(1, len(ids)):
        prompt, output = ids[:cut], ids[cut:]
        _, deltas, _ = stream(tok, prompt, output)
        assert "".join(deltas) == text_after(tok, prompt, output)
        assert not any("\ufffd" in delta for delta in deltas)


def test_leading_space_of_first_token_kept_after_prompt(tok: Any) -> None:
    prompt, output = encode(tok, "Hello"), encode(tok, " world")
    assert stream(tok, prompt, output)[0].output_text == " world"


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_random_token_ids_never_raise(tok: Any, data: st.DataObject) -> None:
    # Models can emit byte tokens that form no valid UTF-8; decoding must go on regardless.
    output = data.draw(st.lists(st.integers(3, len(tok) - 1), min_size=1, max_size=30))
    detok, deltas, _ = stream(tok, encode(tok, "hi"), output)
    assert "".join(deltas) == detok.output_text


# Special tokens, detokenize=False, decode_token -----------------------------------------------


def test_skip_special_tokens(tok: Any) -> None:
    prompt = encode(tok, "x")
    output = encode(tok, "one") + [tok.convert_tokens_to_ids("</s>")] + encode(tok, "two")
    skipped = stream(tok, prompt, output)[0].output_text
    assert skipped == text_after(tok, prompt, output) and "two" in skipped and "</s>" not in skipped
    kept = stream(tok, prompt, output, skip_special_tokens=False)[0].output_text
    assert kept == text_after(tok, prompt, output, skip_special_tokens=False) and "</s>" in kept


def test_detokenize_false_gives_no_text(byte_level: PreTrainedTokenizerFast) -> None:
    detok, deltas, stop = stream(byte_level, [1], encode(byte_level, "some text"), detokenize=False)
    assert detok.output_text == "" and deltas == [""] * len(deltas) and stop is None


def test_decode_token(byte_level: PreTrainedTokenizerFast) -> None:
    text = "Hello world, the end"
    assert "".join(decode_token(byte_level, t) for t in encode(byte_level, text)) == text
    assert decode_token(byte_level, byte_level.convert_tokens_to_ids("</s>")) == "</s>"


# Stop strings ----------------------------------------------------------------------------------


def reference_stop(tokenizer: Any, output: list[int], stops: list[str], include: bool) -> tuple[str, str | None]:
    """Naive reference: after each token, search the whole text; the first stop string to
    appear wins (the earliest-starting one when several appear with the same token)."""
    for count in range(1, len(output) + 1):
        text = text_after(tokenizer, [], output[:count])
        found = [(text.index(s), s) for s in stops if s in text]
        if found:
            index, stop = min(found, key=lambda f: f[0])
            return text[: index + len(stop) if include else index], stop
    return text_after(tokenizer, [], output), None


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet="abc d,é你🚀", min_size=1, max_size=30),
    picks=st.lists(st.tuples(st.integers(0, 29), st.integers(1, 5)), min_size=1, max_size=3),
    extra=st.lists(st.text(alphabet="abc d", min_size=1, max_size=4), max_size=2),
    include=st.booleans(),
)
def test_stop_strings_match_naive_reference_and_never_leak(
    byte_level: PreTrainedTokenizerFast, text: str, picks: list[tuple[int, int]], extra: list[str], include: bool
) -> None:
    # Stop strings drawn from the text itself match across and inside token boundaries.
    stops = [text[start : start + length] for start, length in picks if text[start : start + length]] + extra
    output = encode(byte_level, text)
    detok, deltas, stop = stream(byte_level, [], output, stop=stops, include_stop_str_in_output=include)
    expected_text, expected_stop = reference_stop(byte_level, output, stops, include)
    assert (detok.output_text, stop) == (expected_text, expected_stop)
    # Every delta taken so far was final text: nothing is ever taken back.
    assert "".join(deltas) == expected_text


def test_stop_string_cut_exactly(byte_level: PreTrainedTokenizerFast) -> None:
    output = encode(byte_level, "Hello world, this is a test.")
    detok, deltas, stop = stream(byte_level, [], output, stop=["is a", "zzz"])
    assert stop == "is a"
    assert detok.output_text == "".join(deltas) == "Hello world, this "


def test_stop_string_ending_mid_token(byte_level: PreTrainedTokenizerFast) -> None:
    output = encode(byte_level, "Hello world, the end")
    assert [byte_level.decode([t]) for t in output][:4] == ["Hell", "o", " wor", "ld"]
    detok, deltas, stop = stream(byte_level, [], output, stop=["o wo"])  # ends inside " wor"
    assert stop == "o wo" and detok.output_text == "".join(deltas) == "Hell"
    detok, deltas, stop = stream(byte_level, [], output, stop=["o wo"], include_stop_str_in_output=True)
    assert detok.output_text == "".join(deltas) == "Hello wo"


def test_stop_string_across_tokens(byte_level: PreTrainedTokenizerFast) -> None:
    output = encode(byte_level, "Hello world, the end")
    detok, deltas, stop = stream(byte_level, [], output, stop=["lo wo"])
    assert stop == "lo wo" and "".join(deltas) == "Hel"


def test_min_tokens_delays_stop_checks(byte_level: PreTrainedTokenizerFast) -> None:
    output = encode(byte_level, "a, b, c")
    assert [byte_level.decode([t]) for t in output] == ["a", ",", " ", "b", ",", " ", "c"]
    for min_tokens, expected in [(0, "a"), (2, "a"), (3, "a, b"), (5, "a, b"), (6, "a, b, c")]:
        detok, deltas, _ = stream(byte_level, [], output, stop=[","], min_tokens=min_tokens)
        assert detok.output_text == "".join(deltas) == expected


def test_stop_string_begun_before_min_tokens_counts(byte_level: PreTrainedTokenizerFast) -> None:
    output = encode(byte_level, "xyz abc")
    assert [byte_level.decode([t]) for t in output] == ["x", "y", "z", " a", "b", "c"]
    cases = [
        ("z a", 4, "z a", "xy"),  # completed by the 4th token, which counts
        ("z a", 5, None, "xyz abc"),  # complete before min_tokens: never a stop
        ("z ab", 5, "z ab", "xy"),  # begun before min_tokens, completed after: a stop
    ]
    for stop_string, min_tokens, expected_stop, expected_text in cases:
        detok, _, stop = stream(byte_level, [], output, stop=[stop_string], min_tokens=min_tokens)
        assert (stop, detok.output_text) == (expected_stop, expected_text)


def test_take_delta_holds_back_a_possible_stop_and_releases_it(byte_level: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=["world!"]))
    ids = encode(byte_level, "Hello world, bye")
    taken = []
    for count, token_id in enumerate(ids, start=1):
        assert detok.append([token_id], count) is None
        taken.append(detok.take_delta(finished=False))
        if detok.output_text == "Hello world":
            assert "".join(taken) == "Hello "  # "world" may still become "world!"
    assert "".join(taken) == "Hello world, bye"  # "," showed it was not a stop string


def test_take_delta_releases_everything_when_finished(byte_level: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=["lo!"]))
    ids = encode(byte_level, "Hello")
    detok.append(ids, len(ids))
    assert detok.take_delta(finished=False) == "Hel"
    assert detok.take_delta(finished=True) == "lo"
    assert detok.take_delta(finished=True) == ""
