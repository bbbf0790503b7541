"""Video reading (apet.media.video): every input form samples the authors' frames; bad input -> InputError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from videos import decode_all, make_frames, uniform, write_video

from apet.errors import InputError
from apet.media import video
from apet.media.video import read_video, sample_indices


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("videos")
    frames = make_frames(0, 19)
    files = {codec: write_video(root / f"clip.{ext}", frames, codec) for codec, ext in
             (("mpeg4", "mp4"), ("libvpx", "webm"), ("mjpeg", "avi"))}
    return {"frames": frames, "files": files, "root": root}


def test_sampling_is_the_authors_linspace() -> None:
    assert sample_indices(19, 8).tolist() == [0, 2, 5, 7, 10, 12, 15, 18]
    assert sample_indices(8, 8).tolist() == list(range(8))
    assert sample_indices(300, 8).tolist() == uniform(300, 8).tolist()


@pytest.mark.parametrize("codec", ["mpeg4", "libvpx", "mjpeg"])
def test_video_files_give_the_sampled_decoded_frames(clip: dict, codec: str) -> None:
    """WebM does not store a frame count: the reader counts packets first; all give the same frames."""
    path = clip["files"][codec]
    everything = decode_all(path)
    got = read_video(str(path), 8)
    assert got.dtype == np.uint8 and got.shape == (8, 64, 96, 3)
    np.testing.assert_array_equal(got, everything[uniform(len(everything), 8)])
    corner = got[:, 2:10, 2:10].mean(axis=(1, 2, 3))  # each frame's number survives the codec
    np.testing.assert_allclose(corner, [(t * 37) % 256 for t in uniform(19, 8)], atol=12)


def test_npy_directory_array_and_list_agree(clip: dict, tmp_path: Path) -> None:
    frames = clip["frames"]
    want = frames[uniform(19, 8)]
    np.save(tmp_path / "clip.npy", frames)
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{t:04d}.png")
    (folder / "notes.txt").write_text("ignored")
    np.testing.assert_array_equal(read_video(tmp_path / "clip.npy", 8), want)
    np.testing.assert_array_equal(read_video(folder, 8), want)
    np.testing.assert_array_equal(read_video(frames, 8), want)
    np.testing.assert_array_equal(read_video(list(frames), 8), want)
    np.testing.assert_array_equal(read_video(frames.astype(np.float32) / 255, 8), want)
    assert read_video(frames[..., 0], 8).shape == (8, 64, 96, 3)  # greyscale -> RGB


def _corrupt(root: Path) -> Path:
    path = root / "corrupt.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return path


def _truncated(root: Path) -> Path:
    data = write_video(root / "full.mp4", make_frames(1, 12)).read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    return root / "truncated.mp4"


def _empty_file(root: Path) -> Path:
    (root / "empty.mp4").write_bytes(b"")
    return root / "empty.mp4"


def _zero_frames(root: Path) -> Path:
    np.save(root / "zero.npy", np.zeros((0, 32, 32, 3), np.uint8))
    return root / "zero.npy"


def _empty_directory(root: Path) -> Path:
    (root / "none").mkdir()
    return root / "none"


def _short(root: Path) -> Path:
    return write_video(root / "short.mp4", make_frames(2, 5))


def _not_a_video(root: Path) -> Path:
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    return root / "text.mp4"


def _pickled_npy(root: Path) -> Path:
    np.save(root / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return root / "objects.npy"


def _huge_npy(root: Path) -> Path:
    """A sparse file: the header claims 8 frames of 9000 x 9000; nothing is read."""
    array = np.lib.format.open_memmap(root / "huge.npy", mode="w+", dtype=np.uint8, shape=(8, 9000, 9000, 3))
    del array
    return root / "huge.npy"


def _wrong_shape(root: Path) -> Path:
    np.save(root / "flat.npy", np.zeros((8, 10), np.uint8))
    return root / "flat.npy"


@pytest.mark.parametrize("make, words", [
    (_corrupt, "cannot be decoded"), (_truncated, "cannot be decoded"), (_empty_file, "empty"),
    (_zero_frames, "no frames"), (_empty_directory, "no frames"), (_short, "fewer than the 8"),
    (_not_a_video, "cannot be decoded"), (_pickled_npy, "not a readable .npy"), (_huge_npy, "9000x9000"),
    (_wrong_shape, "shape"), (lambda root: root / "missing.mp4", "does not exist"),
])
def test_bad_videos_raise_input_errors(tmp_path: Path, make, words: str) -> None:
    with pytest.raises(InputError, match=words):
        read_video(make(tmp_path), 8)


def test_huge_video_file_fails_before_decoding(clip: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(video, "MAX_FRAME_PIXELS", 96 * 64 - 1)
    with pytest.raises(InputError, match="96x64 frames, over the"):
        read_video(clip["files"]["mpeg4"], 8)


def test_frames_of_different_sizes_and_bad_arguments(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for t in range(8):
        Image.new("RGB", (32 + t, 32)).save(folder / f"{t}.png")
    with pytest.raises(InputError, match="different sizes"):
        read_video(folder, 8)
    with pytest.raises(InputError, match="frames=0"):
        read_video(folder, 0)
    with pytest.raises(InputError, match="cannot be read from dict"):
        read_video({"video": 1}, 8)
