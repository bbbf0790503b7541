"""Reading user video into T uniformly sampled RGB frames, torch-free.

A video is one of: a video file (MP4/MKV/WebM/AVI/MOV/..., decoded with PyAV), a directory of frame
images (sorted by name), a ``.npy`` file or a numpy array ``[T, H, W, 3]`` (uint8, or floats in
[0, 1]), a sequence of images (anything :func:`apet.media.images.load_image` takes), or ``@demo``
(a pan across the bundled demo image). The result is always ``uint8 [frames, H, W, 3]``.

Why PyAV: it is the maintained Python binding of FFmpeg, its wheels bundle FFmpeg (no system
package), it decodes every container and codec FFmpeg does and reads stream metadata before
decoding (so a huge or empty video fails before any frame is decoded), and it is what the Hugging
Face Video-LLaVA examples and ``transformers.video_utils`` use. decord (the authors' reader) has had no
release since 2022 and no wheels for current Pythons; OpenCV is a far larger dependency with
unreliable frame counts. PyAV is an optional extra (``pip install "apet[video]"``): frame
directories and arrays need nothing beyond numpy and Pillow.

Sampling follows the authors' Video-LLaVA (``np.linspace(0, total - 1, frames).astype(int)``:
first and last frame included); a video with fewer frames than requested is an error, not padded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from apet.errors import BackendError, InputError
from apet.media.images import MAX_PIXELS, load_image

MAX_FRAME_PIXELS = MAX_PIXELS  # per frame, the same decompression-bomb limit as a still image
MAX_FRAMES = 1 << 20  # a stream claiming more frames than this is treated as corrupt
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")

VideoInput = Union[str, os.PathLike, np.ndarray, Sequence[Any]]


DEMO = "@demo"  # a short clip made from the package's demo image, usable wherever a video is
DEMO_FRAMES = 16


def demo_frames() -> np.ndarray:
    """uint8 [16, 240, 240, 3]: a slow pan across the bundled demo image (no video file ships with apet)."""
    from apet.media.images import demo_image_path

    image = np.asarray(load_image(demo_image_path()))
    side = min(image.shape[:2])
    steps = np.linspace(0, image.shape[1] - side, DEMO_FRAMES).astype(int)
    return np.stack([image[:side, x:x + side] for x in steps])


def sample_indices(total: int, frames: int, name: str = "the video") -> np.ndarray:
    """``frames`` indices spread uniformly over ``total`` frames, first and last included (the authors')."""
    if total <= 0:
        raise InputError(f"{name} has no frames", "pass a video with at least one decodable frame")
    if total < frames:
        raise InputError(f"{name} has {total} frame(s), fewer than the {frames} the model samples",
                         f"pass a longer video (at least {frames} frames), or re-export with --frames {total}")
    return np.linspace(0, total - 1, frames).astype(np.int64)


def _check_frame_size(width: int, height: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f"{name} has frames of zero size ({width}x{height})", "pass a video with pixels")
    if width * height > MAX_FRAME_PIXELS:
        raise InputError(f"{name} has {width}x{height} frames, over the {MAX_FRAME_PIXELS:,}-pixel limit",
                         "downscale it first (the model sees 224x224 per frame)")


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError(f"{name} contains NaN or Inf", "pass finite pixel values")
        scale = 255.0 if array.size and array.max() <= 1.0 else 1.0
        return (array * scale).clip(0, 255).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        return array.clip(0, 255).astype(np.uint8)
    raise InputError(f"{name} has dtype {array.dtype}", "pass uint8 pixels or floats in [0, 1]")


def _from_array(array: Any, frames: int, name: str) -> np.ndarray:
    """[T, H, W, 3] (or [T, H, W] greyscale) -> sampled uint8 [frames, H, W, 3]; reads only sampled frames
    of a memory-mapped array."""
    if not hasattr(array, "shape") or len(array.shape) not in (3, 4) or \
            (len(array.shape) == 4 and array.shape[-1] not in (1, 3, 4)):
        shape = getattr(array, "shape", type(array).__name__)
        raise InputError(f"{name} has shape {shape}", "pass frames as [T, H, W, 3] (RGB) or [T, H, W]")
    _check_frame_size(int(array.shape[2]), int(array.shape[1]), name)
    picked = np.asarray(array[sample_indices(int(array.shape[0]), frames, name)])
    if picked.ndim == 3:
        picked = picked[..., None]
    picked = _to_uint8(picked, name)
    if picked.shape[-1] == 1:
        picked = np.repeat(picked, 3, axis=-1)
    return np.ascontiguousarray(picked[..., :3])


def _from_npy(path: Path, frames: int) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # ValueError (pickled / bad header), OSError, EOFError, ...
        raise InputError(f"video {path} is not a readable .npy array ({type(exc).__name__}: {exc})",
                         "save the frames with numpy.save(path, frames) as a [T, H, W, 3] uint8 array") from exc
    return _from_array(array, frames, f"video {path}")


def _from_directory(path: Path, frames: int) -> np.ndarray:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)
    picked = [files[i] for i in sample_indices(len(files), frames, f"frame directory {path}")]
    return _stack([np.asarray(load_image(p)) for p in picked], f"frame directory {path}")


def _stack(images: list[np.ndarray], name: str) -> np.ndarray:
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise InputError(f"{name} has frames of different sizes {sorted(shapes)}", "pass frames of one size")
    return np.ascontiguousarray(np.stack(images))


def _import_av() -> Any:
    try:
        import av
    except Exception as exc:
        raise BackendError(f"decoding video files needs PyAV, which cannot be imported ({exc})",
                           'pip install "apet[video]" (or pass a directory of frames / a .npy array)') from exc
    return av


def _decode(path: Path, frames: int) -> np.ndarray:
    """Decode only what is needed: the frame count from the container (one demux pass when the container
    does not say), then the sampled frames in one sequential decode."""
    av = _import_av()
    name = f"video {path}"
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise InputError(f"{name} has no video stream", "pass a file that contains video")
            stream = container.streams.video[0]
            _check_frame_size(stream.codec_context.width, stream.codec_context.height, name)
            total = int(stream.frames or 0)
            if total <= 0 or total > MAX_FRAMES:
                total = sum(1 for packet in container.demux(stream) if packet.size)
                container.seek(0)
            wanted = sample_indices(total, frames, name)
            got = _decode_indices(container, stream, wanted)
            if len(got) < frames:  # the container over-counted: sample again over what really decodes
                container.seek(0)
                decoded = sum(1 for _ in container.decode(stream))
                container.seek(0)
                got = _decode_indices(container, stream, sample_indices(decoded, frames, name))
    except (InputError, BackendError):
        raise
    except Exception as exc:  # av.error.* (InvalidDataError, ...), OSError, ValueError
        raise InputError(f"{name} cannot be decoded ({type(exc).__name__}: {exc})",
                         "pass a valid video file (it may be truncated, corrupt or not a video)") from exc
    return _stack(got, name)


def _decode_indices(container: Any, stream: Any, wanted: np.ndarray) -> list[np.ndarray]:
    """Frames at ``wanted`` (sorted, possibly repeated) in one pass, as uint8 RGB arrays."""
    out: list[np.ndarray] = []
    last = int(wanted[-1])
    for i, frame in enumerate(container.decode(stream)):
        if i > last:
            break
        repeats = int(np.count_nonzero(wanted == i))
        if repeats:
            rgb = frame.to_ndarray(format="rgb24")
            out += [rgb] * repeats
    return out


def read_video(source: VideoInput, frames: int) -> np.ndarray:
    """Any supported video input -> uint8 ``[frames, H, W, 3]`` sampled uniformly, or InputError."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise InputError(f"frames={frames!r} is invalid", "sample at least one frame")
    if isinstance(source, str) and source == DEMO:
        return _from_array(demo_frames(), frames, "the demo clip")
    if isinstance(source, np.ndarray):
        return _from_array(source, frames, "video array")
    if isinstance(source, (list, tuple)):
        images = [np.asarray(load_image(item)) for item in source]
        picked = [images[i] for i in sample_indices(len(images), frames, "the frame list")]
        return _stack(picked, "the frame list")
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"a video cannot be read from {type(source).__name__}",
                         "pass a video file path, a directory of frames, a .npy file or a [T, H, W, 3] array")
    path = Path(source)
    if path.is_dir():
        return _from_directory(path, frames)
    if not path.is_file():
        raise InputError(f"video {path} does not exist", "check the path passed to --video")
    if path.stat().st_size == 0:
        raise InputError(f"video {path} is empty (0 bytes)", "pass a video file with frames")
    if path.suffix.lower() == ".npy":
        return _from_npy(path, frames)
    return _decode(path, frames)
