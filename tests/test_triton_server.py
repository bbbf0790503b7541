"""A real ``tritonserver`` over a repository from ``apet triton`` (docs/triton.md), on loopback, bounded in time.

The server is the one ``nvidia-pytriton`` bundles (Python backend only, so the vision model is in its Python form,
ONNX Runtime inside); it pins numpy<2, so it lives in its own environment, named by APET_TRITON_VENV, which also
has tritonclient[grpc] and apet installed as a package, not editable (tests/triton_client.py runs there). The
Python backend's stub embeds that environment's interpreter: its libpython goes on LD_LIBRARY_PATH, and the
server runs in the environment's site-packages (tests/triton_local.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from triton_local import START_TIMEOUT_S, TritonServer

from apet.runtime.pipeline import Pipeline
from apet.triton.repository import write_repository

VENV = Path(os.environ.get("APET_TRITON_VENV", "/nonexistent"))
PROMPT = "What is in the picture?"
TOKENS = 6
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not (VENV / "bin" / "python").is_file(),
                                reason="APET_TRITON_VENV is not set to a venv with nvidia-pytriton, "
                                       "tritonclient[grpc] and apet (see docs/triton.md)")


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _serve(artifact: Path, work: Path) -> Iterator[TritonServer]:
    write_repository(artifact, work / "repo", vision_form="python")
    server = TritonServer(VENV, work / "repo", work)
    try:
        assert server.ready(), f"tritonserver did not become ready:\n{server.log.read_text()[-3000:]}"
        yield server
    finally:
        server.stop()


def _ask(server: TritonServer, requests: list[dict], work: Path, clients: int = 0,
         timeout: float = 300) -> list[dict]:
    path = work / f"requests-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(requests))
    command = [str(_venv_python()), str(ROOT / "tests" / "triton_client.py"), str(server.grpc), str(path)]
    done = subprocess.run(command + ([str(clients)] if clients else []), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen2_5_vl", "video-llava", "qwen3_vl", "internvl"])
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
    server = TritonServer(VENV, tmp_path / "repo", tmp_path)
    try:
        code = server.wait_exit(START_TIMEOUT_S)  # a model that fails to load stops the server (exit-on-error)
    finally:
        server.stop()
    log = server.log.read_text()
    assert code not in (None, 0), log[-3000:]
    assert "vision.onnx failed its digest check" in log, log[-3000:]


def test_serve_vs_triton_script_measures_both_servers_under_one_load(family_artifacts, tmp_path) -> None:
    """scripts/serve_vs_triton.py (docs/triton.md's table) with a small load: both servers answer every request with
    the pipeline's greedy tokens, and the JSON carries requests/s and latency percentiles for each round."""
    out = tmp_path / "result.json"
    command = [sys.executable, str(ROOT / "scripts" / "serve_vs_triton.py"), "--artifact",
               str(family_artifacts["llava"]), "--triton-venv", str(VENV), "--clients", "2", "--requests", "3",
               "--rounds", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["servers"]) == {"apet-serve", "triton"}
    for server in result["servers"].values():
        (run,) = server["rounds"]
        assert run["requests"] == 6 and run["errors"] == 0 and run["answers_equal_pipeline"], run
        assert run["requests_per_s"] == pytest.approx(6 / run["wall_s"], rel=0.01)
        assert 0 < run["p50_s"] <= run["p95_s"] <= run["wall_s"]
    expected = Pipeline.load(family_artifacts["llava"], backend="onnxruntime").generate(
        str(ROOT / "apet" / "assets" / "demo.png"), PROMPT, max_new_tokens=6).token_ids
    assert result["expected_token_ids"] == expected
