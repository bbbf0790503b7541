"""A real ``tritonserver`` over a repository from ``apet triton`` (docs/triton.md), on loopback, bounded in time.

The server is the one ``nvidia-pytriton`` bundles (Python backend only, so the vision model is in its Python form,
ONNX Runtime inside); it pins numpy<2, so it lives in its own environment, named by APET_TRITON_VENV, which also
has tritonclient[grpc] and apet installed as a package, not editable (tests/triton_client.py runs there). The
Python backend's stub embeds that environment's interpreter: its libpython goes on LD_LIBRARY_PATH, and the
server runs in the environment's site-packages (see Server).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from conftest import make_image
from videos import make_frames

from apet.runtime.pipeline import Pipeline
from apet.triton.repository import write_repository

VENV = Path(os.environ.get("APET_TRITON_VENV", "/nonexistent"))
PROMPT = "What is in the picture?"
TOKENS = 6
ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(not (VENV / "bin" / "python").is_file(),
                                reason="APET_TRITON_VENV is not set to a venv with nvidia-pytriton, "
                                       "tritonclient[grpc] and apet (see docs/triton.md)")


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _probe(code: str) -> str:
    return subprocess.run([str(_venv_python()), "-c", code], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``tritonserver`` over ``repo`` on 127.0.0.1; its log in ``log``."""

    def __init__(self, repo: Path, work: Path) -> None:
        site = Path(_probe("import sysconfig; print(sysconfig.get_paths()['purelib'])"))
        libdir = _probe("import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
        version = _probe("import sysconfig; print(sysconfig.get_python_version())")
        bundle = site / "pytriton" / "tritonserver"
        backends = work / "backends" / "python"  # the Python backend with the stub of this interpreter's version
        backends.mkdir(parents=True, exist_ok=True)
        for source in (bundle / "backends" / "python" / "libtriton_python.so",
                       bundle / "backends" / "python" / "triton_python_backend_utils.py",
                       bundle / "python_backend_stubs" / version / "triton_python_backend_stub"):
            shutil.copy2(source, backends / source.name)
        self.http, self.grpc = _free_port(), _free_port()
        env = {**os.environ,
               "LD_LIBRARY_PATH": f"{libdir}:{site / 'nvidia_pytriton.libs'}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        self.log = work / "tritonserver.log"
        self.process = subprocess.Popen(
            [str(bundle / "bin" / "tritonserver"), "--model-repository", str(repo),
             "--backend-directory", str(work / "backends"), "--http-address", "127.0.0.1",
             "--http-port", str(self.http), "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc),
             "--allow-metrics", "false", "--exit-timeout-secs", "5"],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
            cwd=site)  # the stub's embedded Python ignores PYTHONPATH but puts its working directory first on
        # sys.path: the environment's packages (numpy<2, onnxruntime, apet installed there) come before the base
        # interpreter's

    def ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                time.sleep(0.5)
        return False

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            if self.wait_exit(15) is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("triton_media")
    make_image(3).save(root / "image.png")
    np.save(root / "clip.npy", make_frames(5, 12, (112, 96)))
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    return {"image": root / "image.png", "video": root / "clip.npy", "bad": root / "bad.png"}


@pytest.fixture(scope="module")
def family_artifacts(artifact_factory, qwen_artifact_factory, next_artifact_factory,
                     video_artifact_factory, internvl_artifact_factory) -> dict[str, Path]:
    """The same option sets as tests/test_triton.py and tests/test_runtime_env.py (exported once per run)."""
    return {"llava": artifact_factory(ratio=0.11, stages=2), "qwen2_5_vl": qwen_artifact_factory(),
            "llava-next": next_artifact_factory(tokens="32", stages=1),
            "video-llava": video_artifact_factory(ratio=0.125),
            "internvl": internvl_artifact_factory(tokens="64", family_options={"apet-at": "after-projector"})}


def _serve(artifact: Path, work: Path) -> Iterator[Server]:
    write_repository(artifact, work / "repo", vision_form="python")
    server = Server(work / "repo", work)
    try:
        assert server.ready(), f"tritonserver did not become ready:\n{server.log.read_text()[-3000:]}"
        yield server
    finally:
        server.stop()


def _ask(server: Server, requests: list[dict], work: Path, clients: int = 0, timeout: float = 300) -> list[dict]:
    path = work / f"requests-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(requests))
    command = [str(_venv_python()), str(ROOT / "tests" / "triton_client.py"), str(server.grpc), str(path)]
    done = subprocess.run(command + ([str(clients)] if clients else []), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen2_5_vl", "video-llava", "internvl"])
def test_greedy_answers_through_triton_equal_the_pipeline(family, family_artifacts, media, tmp_path) -> None:
    artifact = family_artifacts[family]
    kind = "video" if family == "video-llava" else "image"
    pipeline = Pipeline.load(artifact, backend="onnxruntime")
    if kind == "video":
        expected = pipeline.generate(video=str(media["video"]), prompt=PROMPT, max_new_tokens=TOKENS)
    else:
        expected = pipeline.generate(str(media["image"]), PROMPT, max_new_tokens=TOKENS)
    keep = np.asarray(expected.keep_index)
    for server in _serve(artifact, tmp_path):
        plain, streamed = _ask(server, [{"prompt": PROMPT, kind: str(media[kind]), "max_tokens": TOKENS},
                                        {"prompt": PROMPT, kind: str(media[kind]), "max_tokens": TOKENS,
                                         "stream": True}], tmp_path)
    for answer in (plain, streamed):
        assert "error" not in answer, answer
        assert answer["token_ids"] == expected.token_ids
        assert answer["keep_index"] == (keep.reshape(1, -1) if keep.ndim == 1 else keep).tolist()
    assert plain["pieces"] == [expected.text]
    assert "".join(streamed["pieces"]) == expected.text and len(streamed["pieces"]) >= 2


def test_concurrent_clients_and_errors_keep_the_server_serving(family_artifacts, media, tmp_path) -> None:
    artifact = family_artifacts["llava"]
    expected = Pipeline.load(artifact, backend="onnxruntime").generate(str(media["image"]), PROMPT,
                                                                       max_new_tokens=TOKENS)
    for server in _serve(artifact, tmp_path):
        bad, long, good = _ask(server, [{"prompt": PROMPT, "image": str(media["bad"]), "max_tokens": 2},
                                        {"prompt": "word " * 5000, "image": str(media["image"]), "max_tokens": 2},
                                        {"prompt": PROMPT, "image": str(media["image"]), "max_tokens": TOKENS}],
                               tmp_path)
        start = time.perf_counter()
        many = _ask(server, [{"prompt": PROMPT, "image": str(media["image"]), "max_tokens": TOKENS}] * 25, tmp_path,
                    clients=8)
        seconds = time.perf_counter() - start
    assert "uploaded bytes" in bad["error"]
    assert "max_context" in long["error"]
    assert good["token_ids"] == expected.token_ids
    assert len(many) == 200 and [a for a in many if "error" in a] == []
    assert all(a["token_ids"] == expected.token_ids for a in many)
    latencies = sorted(a["seconds"] for a in many)
    print(f"triton: 200 requests, 8 clients: {200 / seconds:.1f} requests/s, p95 {latencies[189]:.3f} s")


def test_a_tampered_artifact_is_refused_with_the_digest_in_the_log(family_artifacts, tmp_path) -> None:
    write_repository(family_artifacts["llava"], tmp_path / "repo", vision_form="python")
    target = tmp_path / "repo" / "apet_generate" / "1" / "artifact" / "vision.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.unlink()  # a new file: the hard-linked original stays intact
    target.write_bytes(bytes(data))
    server = Server(tmp_path / "repo", tmp_path)
    try:
        code = server.wait_exit(START_TIMEOUT_S)  # a model that fails to load stops the server (exit-on-error)
    finally:
        server.stop()
    log = server.log.read_text()
    assert code not in (None, 0), log[-3000:]
    assert "vision.onnx failed its digest check" in log, log[-3000:]
