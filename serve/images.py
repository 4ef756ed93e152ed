"""Images of an OpenAI chat request (`image_url` content parts) -> bytes.

    data:image/png;base64,...   always (the usual way to send an image)
    file:///path or /path       only under a folder given with --allow-dir
    http(s)://...               only with --allow-remote-images (fetched with a
                                timeout and the same size limit)

Decoding happens later, in the runtime (Pillow's decompression-bomb limit,
plus the server's own pixel limit checked from the header first).
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.request
from pathlib import Path

from .requests import OpenAIError

FETCH_TIMEOUT_S = 10.0


def image_bytes(url: str, *, max_bytes: int, allow_dirs: list[Path],
                allow_remote: bool) -> bytes:
    if not isinstance(url, str) or not url:
        raise OpenAIError(400, "image_url.url must be a non-empty string", param="messages")
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise OpenAIError(400, "image data URLs must be base64 encoded", param="messages")
        if len(payload) > max_bytes * 4 // 3 + 4:
            raise _too_large(max_bytes)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise OpenAIError(400, "the image data URL is not valid base64",
                              param="messages") from None
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise OpenAIError(400, "remote image URLs are disabled on this server (start it "
                              "with --allow-remote-images), send a data: URL instead",
                              param="messages", code="remote_images_disabled")
        return _fetch(url, max_bytes)
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    real = Path(os.path.realpath(path))
    if not allow_dirs or not any(real.is_relative_to(Path(os.path.realpath(d)))
                                 for d in allow_dirs):
        raise OpenAIError(400, "local image paths are only served from folders given with "
                          "--allow-dir", param="messages", code="path_not_allowed")
    if not real.is_file():
        raise OpenAIError(400, f"image file {path} does not exist", param="messages")
    if real.stat().st_size > max_bytes:
        raise _too_large(max_bytes)
    return real.read_bytes()


def check_pixels(data: bytes, max_pixels: int) -> None:
    """Refuses an image whose header declares more than max_pixels, before it
    is decoded (a small PNG can declare a huge canvas)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return  # not decodable: the runtime says so in its own words
    except Image.DecompressionBombError:
        w = h = max_pixels + 1
    if w * h > max_pixels:
        raise OpenAIError(400, f"the image has {w}x{h} pixels, more than this server's limit of "
                          f"{max_pixels}", param="messages", code="image_too_large")


def _fetch(url: str, max_bytes: int) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as r:  # noqa: S310 (opt-in)
            data = r.read(max_bytes + 1)
    except OSError as e:
        raise OpenAIError(400, f"cannot fetch the image: {e}", param="messages") from None
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    return data


def _too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(413, f"the image is larger than this server's limit of {max_bytes} bytes",
                       param="messages", code="image_too_large")
