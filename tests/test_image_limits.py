"""Images over the pixel limit and files that are not images get apet's own messages, the same through
apet-run and apet-serve: the pixel limit and the fix, and the name of what was passed — never PIL's text
or a buffer's repr (issue 26, item 7)."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import pytest

from apet.errors import InputError
from apet.media.images import MAX_PIXELS, load_image


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixels: enough for any decoder's header check."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize(("side", "count"), [(20000, "400,000,000"), (10000, "10000x10000 = 100,000,000")])
def test_over_the_limit_names_apets_limit(tmp_path: Path, side: int, count: str) -> None:
    """20000^2 is over PIL's own error limit, 10000^2 over its warning limit: both get apet's message."""
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(side, side))
    for source, name in ((path, f"image {path}"), (path.read_bytes(), "the uploaded bytes")):
        with pytest.raises(InputError) as info:
            load_image(source)
        assert str(info.value) == (f"{name} has {count} pixels, over the {MAX_PIXELS:,}-pixel limit — downscale it "
                                   "first (the model sees at most a few hundred pixels per side)")


def test_a_text_file_is_named_not_its_buffer(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    for source, name in ((notes, f"image {notes}"), (notes.read_bytes(), "the uploaded bytes")):
        with pytest.raises(InputError) as info:
            load_image(source)
        message = str(info.value)
        assert message.startswith(f"{name} cannot be decoded: it is not an image"), message
        assert "BytesIO" not in message and "0x" not in message


def test_apet_run_reports_the_pixel_limit(artifact_factory, tmp_path: Path, capsys) -> None:
    from apet.cli import main

    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(20000, 20000))
    artifact = artifact_factory(ratio=0.11, stages=2)
    assert main(["run", str(artifact), "--image", str(huge), "--prompt", "What?", "--backend", "onnxruntime"]) == 3
    err = capsys.readouterr().err
    assert f"has 400,000,000 pixels, over the {MAX_PIXELS:,}-pixel limit — downscale it" in err
    assert "DecompressionBomb" not in err and "DOS attack" not in err


def test_apet_serve_reports_its_pixel_limit() -> None:
    pytest.importorskip("starlette")
    from apet.serve.errors import ApiError
    from apet.serve.media import MediaLimits, resolve

    limits = MediaLimits(max_bytes=1 << 20, max_image_pixels=1_000_000)
    url = "data:image/png;base64," + base64.b64encode(png_header(20000, 20000)).decode()
    with pytest.raises(ApiError) as info:
        resolve("image", url, limits, "messages[0].content[1].image_url")
    error = info.value
    assert error.status == 413 and error.code == "image_too_large", error.message
    assert error.message.startswith("messages[0].content[1].image_url is 400,000,000 pixels, over the server's "
                                    "--max-image-pixels 1,000,000 — downscale it")
