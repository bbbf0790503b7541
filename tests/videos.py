"""Synthetic videos the tests write themselves (PyAV), and an independent way to read them back."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_frames(seed: int, count: int, size: tuple[int, int] = (96, 64)) -> np.ndarray:
    """uint8 [count, H, W, 3]: a gradient with a few squares that move from frame to frame, and each frame's
    number written into a corner block (so a wrong frame choice changes the pixels)."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], -1) * 200
    squares = [(rng.integers(0, width - 16), rng.integers(0, height - 16), rng.integers(-4, 5), rng.integers(-3, 4),
                rng.integers(0, 255, 3)) for _ in range(3)]
    frames = []
    for t in range(count):
        frame = base.copy()
        for x0, y0, dx, dy, colour in squares:
            x, y = int(x0 + dx * t) % (width - 16), int(y0 + dy * t) % (height - 16)
            frame[y:y + 16, x:x + 16] = colour
        frame[:12, :12] = (t * 37) % 256
        frames.append(frame.clip(0, 255).astype(np.uint8))
    return np.stack(frames)


def write_video(path: Path, frames: np.ndarray, codec: str = "mpeg4", rate: int = 8) -> Path:
    import av

    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decode_all(path: Path) -> np.ndarray:
    """Every frame of a video file, decoded plainly (the reference for apet's sampling reader)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def uniform(total: int, count: int) -> np.ndarray:
    """The authors' Video-LLaVA sampling (load_and_transform_video): linspace over the frames, first and last."""
    return np.linspace(0, total - 1, count, dtype=int)
