"""The device side without torch (``pip install apet``): a second environment that .ci/run builds with
``pip install ".[serve,rtx,video]"`` runs, inspects, serves and builds the tiny artifact of every family that this
(full) environment exported, with the same greedy tokens and kept indices as this environment's own run; commands
that need the export extra say so in one line. And, where torch *is* installed (so the check can fail), the
runtime commands never import torch or transformers.

``APET_RUNTIME_VENV`` names that environment (.ci/run sets it); without it the tests that need it are skipped with
that reason.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_image

PROMPT = "What is in the picture?"
TOKENS = 6


def _venv() -> Path | None:
    value = os.environ.get("APET_RUNTIME_VENV")
    return Path(value) if value else None


needs_runtime_env = pytest.mark.skipif(_venv() is None, reason="APET_RUNTIME_VENV is not set (.ci/run builds the "
                                       "torch-free environment with pip install '.[serve,rtx,video]' and sets it)")


def _bin(name: str) -> str:
    return str(_venv() / "bin" / name)


def _clean_env() -> dict[str, str]:
    """The runtime environment must not see this one's packages or source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=_clean_env(),
                          cwd="/")


def _medium(family: str, media: dict[str, Path]) -> tuple[str, Path]:
    return ("--video", media["video"]) if family == "video-llava" else ("--image", media["image"])


def _reference(artifact: Path, family: str, media: dict[str, Path]) -> dict[str, Any]:
    """This environment's own answer (the Python API, ONNX Runtime, one thread like the CLI runs below)."""
    from apet.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(artifact, backend="onnxruntime", threads=1)
    flag, path = _medium(family, media)
    if flag == "--video":
        result = pipeline.generate(None, PROMPT, video=str(path), max_new_tokens=TOKENS)
    else:
        result = pipeline.generate(str(path), PROMPT, max_new_tokens=TOKENS)
    return {"token_ids": result.token_ids, "keep_index": json.loads(json.dumps(result.keep_index))}


@needs_runtime_env
def test_runtime_env_has_no_torch() -> None:
    probe = _cli(_bin("python"), "-c", "import importlib.util as u; print([m for m in ('torch', 'transformers', "
                 "'onnxscript') if u.find_spec(m)])")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]", f"the runtime environment has {probe.stdout.strip()}"
    where = _cli(_bin("python"), "-c", "import apet; print(apet.__file__)")
    assert str(_venv()) in where.stdout, f"apet imported from {where.stdout}: not the installed wheel"


@needs_runtime_env
@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen2_5_vl", "video-llava", "qwen3_vl", "internvl"])
def test_run_and_inspect_without_torch_match_the_full_environment(family, family_artifacts, media) -> None:
    _run_and_inspect(family_artifacts[family], family, media)


@needs_runtime_env
def test_static_kv_artifact_runs_without_torch(artifact_factory, media) -> None:
    """The static-KV form (llm_prefill + llm_decode, caches bound in place: apet/runtime/backends/ort_static.py)
    on the device side too."""
    _run_and_inspect(artifact_factory(ratio=0.11, stages=2, kv_cache="static"), "llava", media)


def _run_and_inspect(artifact: Path, family: str, media) -> None:
    inspect = _cli(_bin("apet"), "inspect", str(artifact))
    assert inspect.returncode == 0, inspect.stderr
    assert "verified   manifest digest" in inspect.stdout, inspect.stdout[-500:]
    flag, path = _medium(family, media)
    run = _cli(_bin("apet-run"), str(artifact), flag, str(path), "--prompt", PROMPT, "--max-new-tokens", str(TOKENS),
               "--backend", "onnxruntime", "--json")
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    expected = _reference(artifact, family, media)
    assert got["token_ids"] == expected["token_ids"]
    assert got["keep_index"] == expected["keep_index"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_request(artifact: Path, body: dict[str, Any]) -> dict[str, Any]:
    import httpx

    port = _free_port()
    server = subprocess.Popen([_bin("apet-serve"), str(artifact), "--host", "127.0.0.1", "--port", str(port),
                               "--backend", "onnxruntime", "--threads", "1", "--served-model-name", "any"],
                              env=_clean_env(), cwd="/",
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.3)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()
    finally:
        server.terminate()
        server.wait(timeout=30)


@needs_runtime_env
@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen2_5_vl", "video-llava", "qwen3_vl", "internvl"])
def test_serve_without_torch_matches_the_full_environment(family, family_artifacts, media) -> None:
    artifact = family_artifacts[family]
    if family == "video-llava":
        part = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," +
                                                   base64.b64encode(media["mp4"].read_bytes()).decode()}}
    else:
        part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                                   base64.b64encode(media["image"].read_bytes()).decode()}}
    body = {"model": "any", "max_tokens": TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}, part]}]}
    data = _serve_request(artifact, body)
    if family == "video-llava":  # the MP4 decodes to the frames of the .npy the reference reads
        expected = _reference(artifact, family, {**media, "video": media["mp4"]})
    else:
        expected = _reference(artifact, family, media)
    assert data["apet"]["token_ids"] == expected["token_ids"]
    assert data["apet"]["keep_index"] == expected["keep_index"]


@needs_runtime_env
def test_build_with_tensorrt_rtx_without_torch(artifact_factory, tmp_path) -> None:
    import shutil

    artifact = tmp_path / "art"
    shutil.copytree(artifact_factory(ratio=0.11, stages=2), artifact)
    built = _cli(_bin("apet-build"), str(artifact), "--backend", "tensorrt-rtx", timeout=900)
    assert built.returncode == 0, built.stderr
    report = json.loads((artifact / "build_report.json").read_text())
    assert report["builder"] == "tensorrt-rtx" and set(report["engines"]) == {"vision", "llm"}
    assert (artifact / "vision.plan").stat().st_size > 0 and (artifact / "llm.plan").stat().st_size > 0
    # engines present, but no CUDA Python bindings (pip install . without [cuda12]/[cuda13]) and no GPU here:
    # --backend auto says why in the log and answers on ONNX Runtime, as docs/jetson.md promises
    image = tmp_path / "image.png"
    image.write_bytes((Path(__file__).parents[1] / "apet" / "assets" / "demo.png").read_bytes())
    run = _cli(_bin("apet-run"), str(artifact), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens",
               str(TOKENS), "--json")
    assert run.returncode == 0, run.stderr
    assert "engines are present but" in run.stderr and "using another backend" in run.stderr
    from apet.runtime.pipeline import Pipeline

    expected = Pipeline.load(artifact, backend="onnxruntime").generate(str(image), PROMPT, max_new_tokens=TOKENS)
    assert json.loads(run.stdout)["token_ids"] == expected.token_ids


@needs_runtime_env
@pytest.mark.parametrize("command", [
    ["apet-export", "--model", "tiny", "--ratio", "0.22", "--out", "{tmp}/out"],
    ["apet-bench", "--model", "tiny", "--out", "{tmp}/bench", "--no-baselines"],
    ["apet-eval", "tiny", "--data", "{tmp}/data.jsonl", "--images", "{tmp}", "--out", "{tmp}/eval"],
    ["apet-run", "{artifact}", "--image", "@demo", "--prompt", "hi", "--backend", "torch"],
    ["apet-serve", "{artifact}", "--backend", "torch", "--port", "0"],
])
def test_commands_that_need_export_say_which_extra(command, artifact_factory, tmp_path) -> None:
    (tmp_path / "data.jsonl").write_text('{"id": "1", "image": "x.png", "question": "q", "answer": "a"}\n')
    make_image(1).save(tmp_path / "x.png")
    args = [a.format(tmp=tmp_path, artifact=artifact_factory(ratio=0.11, stages=2)) for a in command]
    done = _cli(_bin(args[0]), *args[1:], timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 7, done.stderr
    assert len(lines) == 1 and "pip install 'apet[export]'" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


_NO_TORCH_PROBE = r"""
import contextlib, io, json, sys
from apet.cli import main
artifact, image, work = sys.argv[1], sys.argv[2], sys.argv[3]
with open(work + "/data.jsonl", "w") as rows:
    rows.write(json.dumps({"id": "1", "image": image, "question": "What is it?", "answer": "a"}) + "\n")
with contextlib.redirect_stdout(io.StringIO()):
    assert main(["inspect", artifact]) == 0
    assert main(["run", artifact, "--image", image, "--prompt", "hi", "--max-new-tokens", "3",
                 "--backend", "onnxruntime"]) == 0
    assert main(["eval", artifact, "--data", work + "/data.jsonl", "--images", work, "--out", work + "/eval",
                 "--backend", "onnxruntime", "--max-new-tokens", "3"]) == 0
from starlette.testclient import TestClient
from apet.runtime.pipeline import Pipeline
from apet.serve.app import create_app
from apet.serve.config import ServeConfig
from pathlib import Path
app = create_app(Pipeline.load(artifact, backend="onnxruntime", threads=1),
                 ServeConfig(Path(artifact), model_name="any"))
import base64
url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
body = {"model": "any", "max_tokens": 3, "messages": [{"role": "user", "content": [
    {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]}
with TestClient(app) as client:
    answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
print(json.dumps(sorted(m for m in ("torch", "transformers", "onnxscript") if m in sys.modules)))
"""


def test_runtime_commands_never_import_torch_here(artifact_factory, tmp_path) -> None:
    """apet inspect, apet-run, apet-eval of an artifact and an apet-serve request, in one process of this
    environment: torch is installed here, so an accidental import would show in sys.modules."""
    image = tmp_path / "image.png"
    make_image(2).save(image)
    done = subprocess.run([sys.executable, "-c", _NO_TORCH_PROBE, str(artifact_factory(ratio=0.11, stages=2)),
                           str(image), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
