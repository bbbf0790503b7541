"""Reliability and safety: bad inputs give clear errors, interruptions lose nothing, untrusted data
never runs code, fuzzed inputs only raise ApetError, and a Pipeline is safe to share between threads."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import make_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from apet.errors import ApetError, ArtifactError, BackendError, InputError
from apet.manifest import manifest_from_json, read_manifest
from apet.media.images import MAX_PIXELS, load_image
from apet.runtime.backends.base import import_optional
from apet.runtime.pipeline import Pipeline
from apet.runtime.sampling import GenerationConfig

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apet.cli", *args], capture_output=True, text=True, timeout=timeout)


# -- the CLI's error contract -----------------------------------------------------------------------
def test_cli_exit_codes_and_messages(artifact_factory, tmp_path: Path) -> None:
    usage = _cli("export", "--model", "tiny", "--ratio", "1.5", "--out", str(tmp_path / "x"))
    assert usage.returncode == 2 and usage.stderr.startswith("error: ") and " — " in usage.stderr
    assert "Traceback" not in usage.stderr and not (tmp_path / "x").exists()
    verbose = _cli("export", "--model", "tiny", "--ratio", "1.5", "--out", str(tmp_path / "x"), "--verbose")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    artifact = artifact_factory(ratio=0.11, stages=1)
    missing_image = _cli("run", str(artifact), "--image", str(tmp_path / "nope.png"), "--prompt", "hi")
    assert missing_image.returncode == 3 and "does not exist" in missing_image.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{}")
    artifact_error = _cli("run", str(broken), "--image", "@demo", "--prompt", "hi")
    assert artifact_error.returncode == 4 and "schema_version" in artifact_error.stderr
    no_trt = _cli("build", str(artifact), "--backend", "tensorrt")
    if no_trt.returncode != 0:  # where TensorRT itself is installed this builds (or fails for want of a GPU)
        assert no_trt.returncode == 7 and "apet[trt]" in no_trt.stderr  # not installed: a missing extra
    argparse_error = _cli("run")
    assert argparse_error.returncode == 2


def test_missing_backend_package_names_the_extra() -> None:
    with pytest.raises(BackendError) as info:
        import_optional("a_package_that_does_not_exist", "trt", "the tensorrt backend")
    assert 'pip install "apet[trt]"' in str(info.value) and info.value.exit_code == 5


# -- images -----------------------------------------------------------------------------------------
def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims another size (CRC fixed): a decompression-bomb / zero-size probe."""
    data = bytearray(_png(Image.new("RGB", (1, 1))))
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _file(name: str, data: bytes):
    def make(directory: Path) -> Path:
        (directory / name).write_bytes(data)
        return directory / name

    return make


@pytest.mark.parametrize(("make", "words"), [
    (lambda p: p / "missing.png", "does not exist"),
    (_file("empty.png", b""), "empty"),
    (_file("noise.png", bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8))), "cannot be decoded"),
    (_file("text.jpg", b"not an image"), "cannot be decoded"),
    (lambda p: _file("cut.jpg", _jpeg()[: len(_jpeg()) // 2])(p), "cannot be decoded"),
    (lambda p: _file("bomb.png", _png_with_size(20000, 20000))(p), "limit"),
    (lambda p: _file("zero.png", _png_with_size(0, 10))(p), "zero size|cannot be decoded"),
    (lambda p: np.zeros((0, 5, 3), np.uint8), "shape"),
    (lambda p: np.full((4, 4, 3), np.nan), "NaN"),
])
def test_bad_images_raise_input_errors(tmp_path: Path, make, words: str) -> None:
    with pytest.raises(InputError, match=words):
        load_image(make(tmp_path))


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    make_image(3).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["I;16", "CMYK", "P", "RGBA", "LA", "L", "1"])
def test_unusual_modes_are_converted(tmp_path: Path, mode: str) -> None:
    base = make_image(1, (64, 48))
    if mode == "I;16":
        image = Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257))
    elif mode == "RGBA":
        image = base.convert("RGBA")
        image.putalpha(0)  # fully transparent -> composited on white
    else:
        image = base.convert(mode)
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    image.save(path)
    rgb = load_image(path)
    assert rgb.mode == "RGB" and rgb.size == (64, 48)
    pixels = np.asarray(rgb)
    if mode == "RGBA":
        assert (pixels == 255).all()
    else:
        assert pixels.std() > 5  # the content survived the conversion


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = make_image(2, (60, 40))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (40, 60)


# -- atomic writes under kills -----------------------------------------------------------------------
def _scratch(parent: Path, artifact: Path) -> list[Path]:
    """Scratch of a new artifact (beside it) and of a replacement (inside it, which may be a mount point)."""
    return list(parent.glob(".artifact.apet-tmp-*")) + list(artifact.glob(".apet-*"))


def _complete(artifact: Path) -> bool:
    read_manifest(artifact, verify_checksums=True)
    return True


@pytest.mark.slow
def test_killed_export_leaves_previous_artifact_or_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    first = _cli("export", "--model", str(tiny_checkpoint), "--ratio", "0.11", "--dtype", "fp32", "--out", str(out))
    assert first.returncode == 0, first.stderr
    created = read_manifest(out).created
    command = [sys.executable, "-m", "apet.cli", "export", "--model", str(tiny_checkpoint), "--ratio", "0.22",
               "--dtype", "fp32", "--out", str(out), "--overwrite"]
    outcomes = set()
    for delay, sig in [(0.8, signal.SIGKILL), (2.0, signal.SIGKILL), (3.0, signal.SIGTERM), (4.0, signal.SIGKILL),
                       (5.5, signal.SIGTERM)]:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(sig)
        process.wait(timeout=120)
        assert out.is_dir() and _complete(out)  # never half-written, never missing
        outcomes.add("new" if read_manifest(out).created != created else "previous")
        if sig == signal.SIGTERM and process.returncode != 0:
            assert not _scratch(tmp_path, out)  # SIGTERM cleans its scratch directory
        created = read_manifest(out).created
    assert "previous" in outcomes  # at least one kill landed mid-export
    _cli("export", "--model", str(tiny_checkpoint), "--ratio", "0.11", "--dtype", "fp32", "--out", str(out),
         "--overwrite")
    assert not _scratch(tmp_path, out)  # the next run removed scratch left by SIGKILL


@pytest.mark.slow
def test_killed_eval_resumes_without_losing_answers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    make_image(0).save(images / "0.png")
    rows = [{"id": f"q{i}", "image": "0.png", "question": f"Question {i}?", "answer": "x"} for i in range(12)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "apet.cli", "eval", str(tiny_checkpoint), "--data", str(data), "--images",
               str(images), "--ratios", "1.0,0.11", "--out", str(out), "--max-new-tokens", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a few answers are on disk
        if (out / "predictions.jsonl").is_file() and len((out / "predictions.jsonl").read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    before = (out / "predictions.jsonl").read_text().splitlines()
    assert 5 <= len(before) < 24
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    keys = [(r["ratio"], r["id"]) for r in after]
    assert len(keys) == len(set(keys)) == 24
    for line in before:
        try:
            assert json.loads(line) in after  # answered items were kept, not recomputed
        except json.JSONDecodeError:
            pass


# -- safety -----------------------------------------------------------------------------------------
def test_no_code_executing_deserialisation_in_the_package() -> None:
    offenders = []
    for path in (REPO / "apet").rglob("*.py"):
        text = path.read_text()
        # a method named exec (Triton's BLS ``InferenceRequest.exec()``) is not the builtin
        for pattern in (r"\bpickle\b", r"(?<![\w.])eval\(", r"(?<![\w.])exec\(",
                        r"torch\.load\((?![^)]*weights_only=True)", r"trust_remote_code\s*=\s*True", r"yaml\.load\("):
            if re.search(pattern, text):
                offenders.append(f"{path.name}: {pattern}")
    assert offenders == []


def test_pickled_checkpoints_are_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from apet.adapters.llava.adapter import LlavaAdapter

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 pretend pickle")
    with pytest.raises(ArtifactError, match="safetensors"):
        LlavaAdapter.load(pickled)


# -- fuzzing ----------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=4096))
def test_fuzz_image_loader_only_raises_input_errors(data: bytes) -> None:
    try:
        load_image(data)
    except InputError:
        pass


@settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"RIFF"]),
       st.binary(max_size=2048))
def test_fuzz_image_headers_followed_by_garbage(header: bytes, tail: bytes) -> None:
    try:
        image = load_image(header + tail)
        assert image.mode == "RGB" and image.size[0] * image.size[1] <= MAX_PIXELS
    except InputError:
        pass


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) |
                     st.text(max_size=20),
                     lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10),
                                                                                         children, max_size=5),
                     max_leaves=30)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(_json)
def test_fuzz_manifest_parser_with_random_json(data) -> None:
    try:
        manifest_from_json(data)
    except ArtifactError:
        pass


@pytest.fixture(scope="module")
def manifest_json(artifact_factory) -> dict:
    return json.loads((artifact_factory(ratio=0.11, stages=2) / "manifest.json").read_text())


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_manifest_parser_with_mutated_manifests(manifest_json: dict, data) -> None:
    mutated = json.loads(json.dumps(manifest_json))
    paths = [p for p in _paths(mutated) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        target = mutated
        try:
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = data.draw(_json)
        except (KeyError, IndexError, TypeError):
            continue
    try:
        manifest_from_json(mutated)
    except ArtifactError:
        pass


# -- concurrency and load ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_pipeline(artifact_factory) -> Pipeline:
    return Pipeline.load(artifact_factory(ratio=0.11, stages=2), backend="onnxruntime")


def test_pipeline_shared_between_threads(shared_pipeline: Pipeline) -> None:
    prompts = ["What is this?", "Describe the image.", "Any animals?", "Which colors?"]
    images = [make_image(i) for i in range(4)]
    want = [shared_pipeline.generate(images[i], prompts[i], max_new_tokens=6).token_ids for i in range(4)]
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(3):
                got[i] = shared_pipeline.generate(images[i], prompts[i], max_new_tokens=6).token_ids
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and [got[i] for i in range(4)] == want


@pytest.mark.slow
def test_two_hundred_requests_without_memory_growth(shared_pipeline: Pipeline) -> None:
    process = psutil.Process()
    image = make_image(5)
    config = GenerationConfig(max_new_tokens=2)
    for _ in range(40):  # warm-up: allocator pools and caches settle
        shared_pipeline.generate_batch([image], ["What is this?"], config)
    start = process.memory_info().rss
    for i in range(200):
        shared_pipeline.generate_batch([image], [f"Question number {i % 7}?"], config)
    growth_mb = (process.memory_info().rss - start) / 2**20
    assert growth_mb < 25, f"RSS grew by {growth_mb:.1f} MiB over 200 requests"


def test_errors_doc_lists_every_exit_code() -> None:
    text = (REPO / "docs" / "errors.md").read_text()
    for code in ("| 2 |", "| 3 |", "| 4 |", "| 5 |", "| 6 |", "| 7 |", "| 8 |", "| 130 |"):
        assert code in text
    assert isinstance(ApetError("x", "y").exit_code, int)
