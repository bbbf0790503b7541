"""Media parts of a request -> what ``Pipeline.generate_batch`` takes as media.

Images arrive as ``data:`` URLs with base64 PNG/JPEG/WebP (what OpenAI clients send for local files).
``http(s)`` URLs are refused unless the server runs with ``--allow-fetch``: an edge device may be offline,
and a server that fetches arbitrary URLs on a client's behalf is a request-forgery risk; with it, only
public addresses are fetched (apet/serve/fetch.py). Nothing else (``file:``, paths) is ever read.
Limits are checked on the header, before pixels are decoded.

Videos (families whose ``media`` is ``video``) arrive as ``video_url`` parts with a data URL of a video
file; the family's processor reads files, so the bytes go to a temporary file that lives as long as the
request.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from apet.errors import InputError
from apet.media.images import TooManyPixels, load_image, open_lazily
from apet.serve.errors import ApiError, bad_request
from apet.serve.fetch import FetchPolicy, fetch

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
VIDEO_TYPES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv",
               "video/x-msvideo": ".avi"}
_WHITESPACE = re.compile(rb"\s+")


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int
    max_image_pixels: int
    allow_fetch: bool = False
    fetch_timeout_s: float = 10.0
    allow_fetch_private: bool = False  # loopback, private, link-local... destinations (trusted clients only)
    allowed_media_domains: tuple[str, ...] = ()  # empty: any public host

    @property
    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy(self.max_bytes, self.fetch_timeout_s, self.allow_fetch_private,
                           self.allowed_media_domains)


@dataclass
class Media:
    """A resolved media part: ``value`` goes to the pipeline; ``close`` removes a temporary file."""

    kind: str  # "image" | "video"
    value: Any
    path: Path | None = None

    def close(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def resolve(kind: str, url: str, limits: MediaLimits, param: str) -> Media:
    mime, data = _read_url(url, limits, param, kind)
    if kind == "image":
        return Media("image", _image(mime, data, limits, param))
    return _video(mime, data, param)


def _read_url(url: str, limits: MediaLimits, param: str, kind: str) -> tuple[str, bytes]:
    if url.startswith("data:"):
        return _decode_data_url(url, param, kind)
    if url.startswith(("http://", "https://")):
        if not limits.allow_fetch:
            raise bad_request(f"{kind} URLs over http(s) are not fetched by this server",
                              f"send the {kind} inline as a data URL (data:{kind}/...;base64,...), or start "
                              "apet-serve with --allow-fetch", param=param, code="fetch_disabled")
        return fetch(url, limits.fetch_policy, param)
    raise bad_request(f"{param} is not a data: or http(s) URL", f"send data:{kind}/...;base64,<bytes>",
                      param=param, code="invalid_url")


def _decode_data_url(url: str, param: str, kind: str) -> tuple[str, bytes]:
    comma = url.find(",", 0, 512)
    header = url[5:comma].split(";") if comma > 0 else []
    if not header or "base64" not in (p.strip().lower() for p in header[1:]):
        raise bad_request(f"{param} is not a base64 data URL", f"use data:{kind}/<type>;base64,<bytes>",
                          param=param, code="invalid_url")
    mime = header[0].strip().lower()
    payload = _WHITESPACE.sub(b"", url[comma + 1:].encode("ascii", "replace"))
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{param} holds corrupt base64 ({exc})",
                          "encode the file's bytes with standard base64 (e.g. base64 -w0 file.png)",
                          param=param, code="invalid_base64") from exc
    if not data:
        raise bad_request(f"{param} holds no bytes", f"send the {kind} file's bytes", param=param,
                          code="invalid_base64")
    return mime, data


def _image(mime: str, data: bytes, limits: MediaLimits, param: str) -> Image.Image:
    supported = "PNG, JPEG or WebP (data:image/png|jpeg|webp;base64,...)"
    if mime and mime not in IMAGE_TYPES and mime != "application/octet-stream":
        raise bad_request(f"{param} has media type {mime!r}, which this server does not read", f"send {supported}",
                          param=param, code="unsupported_media_type")
    try:
        header = open_lazily(data, param, formats=sorted(set(IMAGE_TYPES.values())))
        width, height = header.size
        pixels = width * height
    except TooManyPixels as exc:  # over PIL's own limit, which is above every --max-image-pixels
        width = height = None
        pixels = exc.pixels if exc.pixels is not None else limits.max_image_pixels + 1
    except UnidentifiedImageError as exc:
        raise bad_request(f"{param} is not a PNG, JPEG or WebP image", f"send {supported}", param=param,
                          code="unsupported_media_type") from exc
    except Exception as exc:  # PIL raises many types on garbage headers
        raise bad_request(f"{param} cannot be read as an image ({type(exc).__name__})", f"send {supported}",
                          param=param, code="invalid_image") from exc
    if pixels > limits.max_image_pixels:
        shape = f"{width}x{height} = " if width is not None else ""
        raise ApiError(413, f"{param} is {shape}{pixels:,} pixels, over the server's "
                       f"--max-image-pixels {limits.max_image_pixels:,} — downscale it (the model sees a few "
                       "hundred pixels per side), or restart apet-serve with a larger --max-image-pixels",
                       "image_too_large", param)
    try:
        return load_image(data)
    except InputError as exc:
        raise bad_request(f"{param}: {exc.what}", exc.fix or f"send {supported}", param=param,
                          code="invalid_image") from exc


def _video(mime: str, data: bytes, param: str) -> Media:
    if mime not in VIDEO_TYPES:
        raise bad_request(f"{param} has media type {mime or 'none'!r}, which this server does not read",
                          f"send one of {', '.join(VIDEO_TYPES)} as data:video/<type>;base64,...", param=param,
                          code="unsupported_media_type")
    handle, name = tempfile.mkstemp(prefix="apet-serve-", suffix=VIDEO_TYPES[mime])
    with os.fdopen(handle, "wb") as file:
        file.write(data)
    return Media("video", Path(name), Path(name))
