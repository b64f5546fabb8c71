"""A vision-language model through `pagoda serve` and the openai client: a chat with a base64
image part, whole and streamed, gives the offline engine's tokens; /metrics counts its image
tokens; every bad image part (not an image, bad base64, too many pixels, more images than
--limit-mm-per-prompt, an http URL while fetching is off, an image for a text-only model) is a
400 naming the part, and the server goes on."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoTokenizer

from pagoda import LLM, SamplingParams
from tests.serving import API_KEY, MODEL, http_client, openai_client, openai_error, serving, tiny_model_args
from tests.tiny_vlm import PARTS_TEMPLATE, random_image, save_tiny_llava

MAX_TOKENS = 6


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def chat_body(parts: list[dict]) -> dict:
    return {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": parts}]}


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("vlm-server"))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """The server's --allowed-local-media-path, holding IMAGE as image.png; beside it, outside.png."""
    root = tmp_path_factory.mktemp("media")
    (root / "allowed").mkdir()
    IMAGE.save(root / "allowed" / "image.png")
    IMAGE.save(root / "outside.png")
    (root / "allowed" / "link.png").symlink_to(root / "outside.png")
    return root / "allowed"


@pytest.fixture(scope="module")
def base(llava, media, tmp_path_factory):
    log = tmp_path_factory.mktemp("vlm-server-log") / "server.log"
    args = [str(llava), "--served-model-name", MODEL, "--max-model-len", "256", "--seed", "0",
            "--limit-mm-per-prompt", '{"image": 2}', "--allowed-local-media-path", str(media)]
    with serving(args, log, {"PAGODA_API_KEY": API_KEY}) as (_, url):
        yield url


IMAGE = random_image(40, 52, seed=11)


def test_chat_with_base64_image_whole_and_streamed(base, llava):
    client = openai_client(base)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "what is in"}, image_part(data_url(IMAGE)),
    ]}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert whole.choices[0].message.content == streamed
    assert whole.usage.completion_tokens == MAX_TOKENS
    # The same chat offline: the server ran the image (a PNG round trip keeps its pixels).
    offline = LLM(str(llava), device="cpu", dtype="float32", max_model_len=256)
    try:
        expected = offline.chat(
            [{"role": "user", "content": [{"type": "text", "text": "what is in"}, {"type": "image_pil", "image_pil": IMAGE}]}],
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0), use_tqdm=False,
        )[0]
    finally:
        offline.shutdown()
    assert whole.choices[0].message.content == expected.outputs[0].text
    assert whole.usage.prompt_tokens == len(expected.prompt_token_ids)  # the image's placeholders count
    with http_client(base) as http:
        metrics = http.get("/metrics").text
    counted = [line for line in metrics.splitlines() if line.startswith("pagoda:prompt_image_tokens_total")]
    assert counted and float(counted[0].split()[-1]) >= 2 * 16


def test_file_urls_are_read_from_the_allowed_folder_only(base, media):
    """vLLM's --allowed-local-media-path: a file:// URL under the folder is the image itself; one
    outside it, through .. or a symbolic link, is a 400 naming the part."""
    with http_client(base) as http:
        sent = http.post("/v1/chat/completions", json=chat_body([image_part(data_url(IMAGE))])).json()
        read = http.post("/v1/chat/completions", json=chat_body([image_part((media / "image.png").as_uri())]))
        assert read.status_code == 200, read.text
        assert read.json()["choices"][0]["message"]["content"] == sent["choices"][0]["message"]["content"]
        for url in [(media.parent / "outside.png").as_uri(), f"file://{media}/../outside.png",
                    (media / "link.png").as_uri()]:
            error = openai_error(http.post("/v1/chat/completions", json=chat_body([image_part(url)])), 400,
                                 "messages.0.content.0")
            assert "is not under the server's --allowed-local-media-path" in error["message"], url
        missing = http.post("/v1/chat/completions", json=chat_body([image_part((media / "none.png").as_uri())]))
        assert "cannot be read" in openai_error(missing, 400, "messages.0.content.0")["message"]


def _png_of_size(width: int, height: int) -> str:
    """A PNG data URL of many pixels but few bytes (one bit each, all the same)."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(("parts", "bad", "message"), [
    ([image_part("data:image/png;base64," + base64.b64encode(b"not an image").decode())], 0, "not an image"),
    ([image_part("data:image/png;base64,@@@")], 0, "not valid base64"),
    ([image_part("data:image/png,raw")], 0, "base64"),
    ([{"type": "image_url", "image_url": {}}], 0, "no image_url.url"),
    ([{"type": "input_audio", "input_audio": {}}], 0, "type 'input_audio'"),
    ([image_part(_png_of_size(9000, 9000))], 0, "pixels"),
    ([image_part(data_url(IMAGE))] * 3, 2, "more than 2 images"),
    ([{"type": "text", "text": "look"}, image_part("http://127.0.0.1:9/x.png")], 1, "--allow-image-url-fetch"),
    ([image_part("ftp://127.0.0.1/x.png")], 0, "must be a data: URL"),
])
def test_bad_image_parts_are_400_naming_the_part(base, parts, bad, message):
    with http_client(base) as http:
        error = openai_error(http.post("/v1/chat/completions", json=chat_body(parts)), 400,
                             f"messages.0.content.{bad}")
        assert message in error["message"]
        ok = http.post("/v1/chat/completions", json=chat_body([image_part(data_url(IMAGE))]))
        assert ok.status_code == 200, ok.text


def test_image_for_a_text_only_model_is_400(tmp_path):
    with serving(tiny_model_args(tmp_path), tmp_path / "server.log", {"PAGODA_API_KEY": API_KEY}) as (_, url):
        with http_client(url) as http:
            body = chat_body([{"type": "text", "text": "hi"}, image_part(data_url(IMAGE))])
            error = openai_error(http.post("/v1/chat/completions", json=body), 400, "messages.0.content")
            assert "text only" in error["message"]
            body = chat_body([{"type": "text", "text": "hi"}])
            assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_a_template_over_parts_gets_the_image_parts_through_the_server(llava, tmp_path):
    """vLLM's "openai" content format through the chat route's render (here /tokenize): a template
    that loops over a message's parts writes each image's tokens itself."""
    template = tmp_path / "parts.jinja"
    template.write_text(PARTS_TEMPLATE)
    args = [str(llava), "--served-model-name", MODEL, "--max-model-len", "256", "--chat-template", str(template)]
    messages = [{"role": "user", "content": [{"type": "text", "text": "see "}, image_part(data_url(IMAGE))]}]
    with serving(args, tmp_path / "server.log", {"PAGODA_API_KEY": API_KEY}) as (_, url), http_client(url) as http:
        tokens = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
        chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2})
    expected = AutoTokenizer.from_pretrained(llava).encode(
        "<|im_start|>user\nsee [IMG]<image>[/IMG]<|im_end|>\n<|im_start|>assistant", add_special_tokens=False
    )
    assert tokens == expected
    assert chat.status_code == 200, chat.text
