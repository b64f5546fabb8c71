"""Images of a chat's content parts: OpenAI's `image_url` parts (a `data:` URL with base64 bytes;
http(s) only with --allow-image-url-fetch; file:// only under --allowed-local-media-path) and
vLLM's `image_pil` parts (LLM.chat). Each image
part becomes an {"type": "image"} part, which the chat's content format makes the model's image
placeholder before the message's text (as vLLM places it) or leaves for a template that writes
its own image tokens; the images come back in prompt order. A bad part is
an ImagePartError naming it (messages.I.content.J)."""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
from pathlib import Path
from typing import Any

from pagoda.multimodal.processing import ImageSources, check_image

# Encoded bytes of one image at most (a data: URL's decoded payload, or a fetched body).
MAX_IMAGE_BYTES = 10 * 2**20
_FETCH_TIMEOUT_S = 10.0


class ImagePartError(ValueError):
    """A content part that gives no usable image; `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def extract_images(
    conversation: list[dict[str, Any]], sources: ImageSources, max_images: int
) -> tuple[list[dict[str, Any]], list[Any]]:
    """The conversation with each image part of a content list made {"type": "image"} (the chat
    template's content format then makes it the model's placeholder, or the template writes its
    own image tokens: chat_utils.format_content), and its images in order. Raises ImagePartError."""
    images: list[Any] = []
    turns = []
    for i, turn in enumerate(conversation):
        content = turn.get("content")
        if not isinstance(content, list):
            turns.append(turn)
            continue
        parts = []
        for j, part in enumerate(content):
            param = f"messages.{i}.content.{j}"
            kind = part.get("type")
            if kind == "text":
                parts.append(part)
                continue
            if kind not in ("image_url", "image_pil"):
                raise ImagePartError(f"messages[{i}].content[{j}] has type {kind!r}: text and image_url parts are supported", param)
            if len(images) == max_images:
                raise ImagePartError(
                    f"messages[{i}].content[{j}]: more than {max_images} images in one prompt (--limit-mm-per-prompt)",
                    param,
                )
            images.append(_part_image(part, sources, f"messages[{i}].content[{j}]", param))
            parts.append({"type": "image"})
        turns.append({**turn, "content": parts})
    return turns, images


def _part_image(part: dict[str, Any], sources: ImageSources, what: str, param: str) -> Any:
    try:
        if part["type"] == "image_pil":
            image = part.get("image_pil")
        else:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ValueError("has no image_url.url")
            image = _load_url(url, sources)
        check_image(image, "the image")
        return image
    except ValueError as error:
        raise ImagePartError(f"{what}: {error}", param) from None


def _load_url(url: str, sources: ImageSources) -> Any:
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ValueError("a data: URL must be data:<media type>;base64,<bytes>")
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise ValueError(f"the image is larger than {MAX_IMAGE_BYTES} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error:
            raise ValueError("the data: URL's payload is not valid base64") from None
        return _decode(data)
    if url.startswith(("http://", "https://")):
        if not sources.allow_fetch:
            raise ValueError("fetching image URLs is off on this server (--allow-image-url-fetch): send a data: URL")
        return _decode(_fetch(url))
    if url.startswith("file:"):
        return _decode(_read_local(url, sources.local_dir))
    raise ValueError("the image URL must be a data: URL (or http(s) with --allow-image-url-fetch, file:// under "
                     "--allowed-local-media-path)")


def _read_local(url: str, local_dir: Path | None) -> bytes:
    """A file:// URL's bytes, from under local_dir only (symbolic links and .. resolved first)."""
    if local_dir is None:
        raise ValueError("file:// image URLs are off on this server (--allowed-local-media-path): send a data: URL")
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).resolve()
    if not path.is_relative_to(local_dir):
        raise ValueError(f"{path} is not under the server's --allowed-local-media-path {local_dir}")
    try:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise ValueError(f"the image is larger than {MAX_IMAGE_BYTES} bytes")
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"{path} cannot be read: {error.strerror}") from None


def _fetch(url: str) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=_FETCH_TIMEOUT_S, follow_redirects=True) as response:
            response.raise_for_status()
            body = bytearray()
            for piece in response.iter_bytes():
                body += piece
                if len(body) > MAX_IMAGE_BYTES:
                    raise ValueError(f"the image is larger than {MAX_IMAGE_BYTES} bytes")
            return bytes(body)
    except httpx.HTTPError as error:
        raise ValueError(f"the image URL could not be fetched: {error}") from None


def _decode(data: bytes) -> Any:
    """A PIL image of encoded bytes; its size is checked (in check_image) before its pixels load."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        check_image(image, "the image")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"the data is not an image this server can read: {error}") from None
    return image
