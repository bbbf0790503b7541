"""apet-serve over real HTTP on loopback: answers equal apet-run's, concurrency never mixes requests,
batching changes no token, bad requests get 4xx JSON and the server keeps serving (issue 19)."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from conftest import make_image

from apet.errors import UsageError
from apet.runtime.pipeline import Pipeline
from apet.runtime.sampling import GenerationConfig

pytest.importorskip("starlette", reason='apet-serve needs pip install "apet[serve]"')
pytest.importorskip("uvicorn", reason='apet-serve needs pip install "apet[serve]"')
pytest.importorskip("prometheus_client", reason='apet-serve needs pip install "apet[serve]"')

from apet.runtime.stopping import StopHoldback  # noqa: E402
from apet.serve.app import create_app  # noqa: E402
from apet.serve.config import ServeConfig  # noqa: E402
from apet.serve.server import BackgroundServer  # noqa: E402

PROMPT = "Describe the image."
LIMITS = dict(max_image_pixels=200_000, max_body_mb=2.0)  # test images are 300x200 = 60,000 pixels


def encode(image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_body(image: bytes | str, prompt: str = PROMPT, mime: str = "image/png", **fields: Any) -> dict[str, Any]:
    url = image if isinstance(image, str) else data_url(image, mime)
    content = [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": "tiny-llava", "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, **fields}


# -- fixtures: one artifact (shared with the runtime tests), a reference pipeline, two servers --------
@pytest.fixture(scope="module")
def artifact(artifact_factory) -> Path:
    return artifact_factory(ratio=0.11, stages=2)


@pytest.fixture(scope="module")
def reference(artifact: Path) -> Pipeline:
    """What apet-run computes: its own Pipeline, batch 1, never touched by a server."""
    return Pipeline.load(artifact, backend="onnxruntime")


@pytest.fixture(scope="module")
def png() -> bytes:
    return encode(make_image(1))


def _server(artifact: Path, **options: Any) -> Iterator[BackgroundServer]:
    options = {"model_name": "tiny-llava", **LIMITS, **options}
    config = ServeConfig(artifact=artifact, backend="onnxruntime", threads=1, **options)
    app = create_app(Pipeline.load(artifact, backend="onnxruntime", threads=1), config)
    with BackgroundServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def server(artifact: Path) -> Iterator[BackgroundServer]:
    yield from _server(artifact)


@pytest.fixture(scope="module")
def small_queue_server(artifact: Path) -> Iterator[BackgroundServer]:
    yield from _server(artifact, max_queue=2)


@pytest.fixture(scope="module")
def batch_server(artifact: Path) -> Iterator[BackgroundServer]:
    yield from _server(artifact, max_batch=4, batch_wait_ms=20)


def post(server: BackgroundServer, body: Any, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, timeout=timeout,
                      headers={"Content-Type": "application/json"})


def stream_events(server: BackgroundServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    events = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True},
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# -- answers equal apet-run's ------------------------------------------------------------------------
def test_answers_equal_apet_run(server, artifact, png, tmp_path, capsys) -> None:
    from openai import OpenAI

    from apet.cli import run_main

    image = tmp_path / "image.png"
    image.write_bytes(png)
    assert run_main([str(artifact), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "8",
                     "--backend", "onnxruntime", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert len(expected["token_ids"]) == 8

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = chat_body(png)["messages"]
    answer = client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == expected["text"]
    assert answer.choices[0].finish_reason == "length"
    apet = answer.model_extra["apet"]
    assert apet["token_ids"] == expected["token_ids"]
    assert apet["keep_index"] == expected["keep_index"]
    assert apet["visual_tokens"] == expected["stats"]["visual_tokens"][0] == 40
    assert apet["ttft_ms"] >= apet["pipeline_ttft_ms"] > 0 and apet["decode_tokens_per_s"] > 0
    usage = answer.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected["stats"]["prompt_tokens"][0], 8)
    assert usage.total_tokens == usage.prompt_tokens + 8 and usage.model_extra["visual_tokens"] == 40

    chunks = list(client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=8,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == expected["text"]
    assert len(deltas) >= 6  # token by token (a token whose bytes end mid-character waits for the next)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].model_extra["apet"]["token_ids"] == expected["token_ids"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


@pytest.mark.parametrize("fmt,mime", [("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_jpeg_and_webp(server, reference, fmt, mime) -> None:
    data = encode(make_image(3), fmt)
    expected = reference.generate(data, PROMPT, max_new_tokens=8)
    answer = post(server, chat_body(data, mime=mime)).json()
    assert answer["apet"]["token_ids"] == expected.token_ids
    assert answer["choices"][0]["message"]["content"] == expected.text


def test_stop_strings_and_seeded_sampling(server, reference, png) -> None:
    full = reference.generate(png, PROMPT, max_new_tokens=8)
    stop = full.text[5:7]  # a stop string inside the greedy answer
    cut = reference.generate(png, PROMPT, max_new_tokens=8, stop=[stop])
    assert cut.finish_reason == "stop" and stop not in cut.text
    answer = post(server, chat_body(png, stop=stop)).json()
    assert answer["choices"][0]["message"]["content"] == cut.text
    assert answer["choices"][0]["finish_reason"] == "stop"
    streamed = stream_events(server, chat_body(png, stop=[stop]))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in streamed) == cut.text

    sampled = reference.generate(png, PROMPT, max_new_tokens=8, temperature=0.9, top_p=0.95, seed=11)
    assert sampled.token_ids != full.token_ids  # the check below could not tell sampling from greedy otherwise
    answer = post(server, chat_body(png, temperature=0.9, top_p=0.95, seed=11)).json()
    assert answer["apet"]["token_ids"] == sampled.token_ids


# -- concurrency and batching ------------------------------------------------------------------------
def _mixed_requests(reference: Pipeline) -> list[tuple[dict[str, Any], Any]]:
    """16 different requests (images, prompts, lengths; some seeded sampling) and apet-run's answer to each."""
    prompts = ["What is in the picture?", "Describe the image.", "How many objects are there?", "Colors?"]
    cases = []
    for i in range(16):
        data = encode(make_image(10 + i, (200 + 8 * i, 160 + 5 * i)))
        sampling = dict(temperature=0.8, seed=i) if i % 4 == 3 else {}
        max_tokens = 4 + i % 5
        config = GenerationConfig(max_tokens, sampling.get("temperature", 0.0), 1.0, sampling.get("seed"))
        expected = reference.generate_batch([data], [prompts[i % 4]], config)[0]
        cases.append((chat_body(data, prompts[i % 4], max_tokens=max_tokens, **sampling), expected))
    return cases


@pytest.mark.parametrize("which", ["server", "batch_server"])
def test_concurrent_requests_get_their_own_answers(which, request, reference) -> None:
    """16 requests from 8 threads; with --max-batch 4 they are decoded in batches, and every answer must
    still be exactly the one apet-run (batch 1) gives."""
    target: BackgroundServer = request.getfixturevalue(which)
    cases = _mixed_requests(reference)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda case: post(target, case[0]), cases))
    for (body, expected), response in zip(cases, answers):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["apet"]["token_ids"] == expected.token_ids
        assert answer["choices"][0]["message"]["content"] == expected.text
    batches = [r.json()["apet"]["batch"] for r in answers]
    if which == "batch_server":
        assert max(batches) > 1, "no request was batched: the test did not exercise --max-batch"
    else:
        assert set(batches) == {1}


def test_batched_streams_equal_batch_one(batch_server, reference) -> None:
    cases = _mixed_requests(reference)[:8]
    with ThreadPoolExecutor(8) as pool:
        streams = list(pool.map(lambda case: stream_events(batch_server, case[0]), cases))
    for (_, expected), events in zip(cases, streams):
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected.text
        assert events[-1]["apet"]["token_ids"] == expected.token_ids


# -- refusals ----------------------------------------------------------------------------------------
def _bad_requests(png: bytes) -> list[tuple[str, Any, int, str]]:
    big = encode(make_image(5, (600, 400)))  # 240,000 pixels > the 200,000 limit
    gif = encode(make_image(6).convert("P"), "GIF")
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    return [
        ("malformed JSON", b'{"model": "tiny-llava", "messages": [', 400, "invalid_json"),
        ("not an object", b"[1, 2]", 400, "invalid_json"),
        ("missing image", {**chat_body(png), "messages": [{"role": "user", "content": PROMPT}]}, 400,
         "missing_media"),
        ("corrupt base64", chat_body("data:image/png;base64,iVBORw0KGgo@@@notbase64"), 400, "invalid_base64"),
        ("unsupported media type", chat_body(gif, mime="image/gif"), 400, "unsupported_media_type"),
        ("GIF labelled PNG", chat_body(gif), 400, "unsupported_media_type"),
        ("truncated PNG", chat_body(png[: len(png) // 2]), 400, "invalid_image"),
        ("oversized image", chat_body(big), 413, "image_too_large"),
        ("body over --max-body-mb", chat_body(b"\0" * (3 << 20)), 413, "body_too_large"),
        ("too many tokens", chat_body(png, max_tokens=5000), 400, "context_length_exceeded"),
        ("prompt too long", chat_body(png, "word " * 2000), 400, "context_length_exceeded"),
        ("unknown model", chat_body(png, model="gpt-4o"), 404, "model_not_found"),
        ("http URL without --allow-fetch", chat_body("http://127.0.0.1:9/cat.png"), 400, "fetch_disabled"),
        ("file URL", chat_body("file:///etc/passwd"), 400, "invalid_url"),
        ("video for an image model", {**chat_body(png), "messages": [{"role": "user", "content": [
            {"type": "text", "text": PROMPT}, video]}]}, 400, "unsupported_media_type"),
        ("two images", {**chat_body(png), "messages": [{"role": "user", "content": [
            {"type": "text", "text": PROMPT}] + chat_body(png)["messages"][0]["content"][1:] * 2}]}, 400,
         "invalid_request"),
        ("assistant turn", {**chat_body(png), "messages": chat_body(png)["messages"] + [
            {"role": "assistant", "content": "hi"}]}, 400, "invalid_request"),
        ("placeholder in prompt", chat_body(png, "what is <image> here"), 400, "invalid_prompt"),
        ("temperature out of range", chat_body(png, temperature=7), 400, "invalid_request"),
        ("max_tokens not an integer", chat_body(png, max_tokens="8"), 400, "invalid_type"),
        ("n > 1", chat_body(png, n=2), 400, "invalid_request"),
    ]


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server, reference, png) -> None:
    expected = reference.generate(png, PROMPT, max_new_tokens=8)
    for name, body, status, code in _bad_requests(png):
        response = post(server, body)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["code"] == code, (name, error)
        assert error["type"] == "invalid_request_error" and len(error["message"]) > 20, name
        assert "Traceback" not in response.text and 'File "' not in response.text, name
        good = post(server, chat_body(png))  # the next good request is answered, and correctly
        assert good.status_code == 200 and good.json()["apet"]["token_ids"] == expected.token_ids, name
    assert "--max-image-pixels" in post(server, _bad_requests(png)[7][1]).json()["error"]["message"]
    assert "max_context" in post(server, chat_body(png, max_tokens=5000)).json()["error"]["message"]
    unknown = httpx.get(f"{server.url}/v2/nothing")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{server.url}/v1/chat/completions").status_code == 405


def test_allow_fetch_reads_http_images(artifact, reference, png) -> None:
    """--allow-fetch alone refuses loopback (the image server here, the server's own /metrics) without
    connecting; with --allow-fetch-private the loopback image is read (tests/test_serve_fetch.py covers the
    other destinations)."""
    import http.server

    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: Any) -> None:
            pass

    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{images.server_address[1]}/cat.png"
    try:
        for fetching in _server(artifact, allow_fetch=True):
            for target in (url, f"http://localhost:{fetching.port}/metrics"):
                refused = post(fetching, chat_body(target))
                assert refused.status_code == 403, refused.text
                error = refused.json()["error"]
                assert error["code"] == "fetch_refused" and "a loopback address" in error["message"]
                assert "--allow-fetch-private" in error["message"]
            assert hits == []
        for fetching in _server(artifact, allow_fetch=True, allow_fetch_private=True):
            answer = post(fetching, chat_body(url)).json()
            assert answer["apet"]["token_ids"] == reference.generate(png, PROMPT, max_new_tokens=8).token_ids
            assert hits == ["/cat.png"]
    finally:
        images.shutdown()


# -- queue, disconnects ------------------------------------------------------------------------------
def _health(server: BackgroundServer) -> dict[str, Any]:
    return httpx.get(f"{server.url}/health").json()


def _wait_for(condition, timeout: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        time.sleep(0.01)
    return time.monotonic() - start


def test_full_queue_503_and_disconnect_frees_the_slot(small_queue_server, png) -> None:
    """One long stream runs, two wait (--max-queue 2), the next gets 503 + Retry-After; closing the stream
    stops its generation at once and the waiting requests are served."""
    server = small_queue_server
    long = chat_body(png, max_tokens=800, stream=True)  # >5 s of decoding if nobody stopped it
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=long, timeout=60) as running:
        lines = running.iter_lines()
        assert next(lines).startswith("data: ")  # generating now
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(post, server, chat_body(png, max_tokens=2)) for _ in range(2)]
            _wait_for(lambda: _health(server)["waiting"] == 2, 10)
            full = post(server, chat_body(png))
            assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
            assert int(full.headers["Retry-After"]) >= 1
            assert _health(server)["running"] == 1
            running.close()  # the client goes away mid-stream
            seconds = _wait_for(lambda: all(w.done() for w in waiting), 10)
            assert all(w.result().status_code == 200 for w in waiting)
    assert seconds < 3.0, f"the abandoned stream kept the worker busy for {seconds:.1f} s"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'apet_request_errors_total{code="queue_full",route="chat"}' in metrics


def test_disconnect_while_waiting_for_a_plain_answer(server, png) -> None:
    with pytest.raises(httpx.ReadTimeout):
        post(server, chat_body(png, max_tokens=800), timeout=0.5)
    seconds = _wait_for(lambda: _health(server)["running"] == 0, 10)
    assert seconds < 3.0, f"the abandoned request kept the worker busy for {seconds:.1f} s"


# -- models, health, metrics, CLI --------------------------------------------------------------------
def test_default_model_id_is_the_artifact_name(artifact) -> None:
    from apet.serve.app import model_facts

    pipeline = Pipeline.load(artifact, backend="onnxruntime")
    assert model_facts(pipeline, None).model_id == artifact.name
    assert model_facts(pipeline, "robot-eyes").model_id == "robot-eyes"


def test_model_id_behind_a_symlink_is_the_links_name(artifact, tmp_path, monkeypatch) -> None:
    """A `current` link repointed between releases must keep the id clients send; `.` names its directory."""
    from apet.serve.app import model_facts

    link = tmp_path / "current"
    link.symlink_to(artifact, target_is_directory=True)
    assert model_facts(Pipeline.load(link, backend="onnxruntime"), None).model_id == "current"
    monkeypatch.chdir(artifact)
    assert model_facts(Pipeline.load(".", backend="onnxruntime"), None).model_id == artifact.name


def test_models_health_metrics(server, png) -> None:
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-llava"]
    assert models["data"][0]["family"] == "llava" and models["data"][0]["apet"]["visual_tokens"] == 40
    assert httpx.get(f"{server.url}/v1/models/tiny-llava").status_code == 200
    assert httpx.get(f"{server.url}/v1/models/other").status_code == 404
    assert _health(server)["status"] == "ok"
    post(server, chat_body(png))
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in ('apet_requests_total{route="chat",status="200"}', "apet_ttft_seconds_bucket",
                 "apet_decode_tokens_per_second_count", "apet_queue_length", "apet_running_requests",
                 "apet_batch_size_count", "apet_completion_tokens_total", "process_resident_memory_bytes"):
        assert name in text, name


KEY = "sk-edge-0123456789"


def test_api_key_guards_the_api_not_the_probes(artifact, png, reference) -> None:
    """With a key, /v1/... answers only 'Authorization: Bearer KEY' (OpenAI's client sends its api_key so) and a
    refusal is a 401 in OpenAI's shape; /health and /metrics stay open for probes and Prometheus."""
    from openai import AuthenticationError, OpenAI

    for server in _server(artifact, api_key=KEY):
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            refused = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10)
            assert refused.status_code == 401, headers
            assert refused.headers["www-authenticate"] == "Bearer"
            error = refused.json()["error"]
            assert error["code"] == "invalid_api_key" and "Authorization: Bearer <key>" in error["message"]
            assert KEY not in refused.text
        assert post(server, chat_body(png)).status_code == 401  # the chat route too
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        metrics = httpx.get(f"{server.url}/metrics", timeout=10)
        assert metrics.status_code == 200
        assert 'apet_request_errors_total{code="invalid_api_key",route="models"} 4.0' in metrics.text

        wrong = OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(AuthenticationError):
            wrong.models.list()
        client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-llava"]
        answer = client.chat.completions.create(model="tiny-llava", messages=chat_body(png)["messages"],
                                                max_tokens=8, temperature=0)
        expected = reference.generate(png, PROMPT, max_new_tokens=8)
        assert answer.model_extra["apet"]["token_ids"] == expected.token_ids


def test_api_key_config_and_cli(artifact, capsys, monkeypatch) -> None:
    """The key comes from --api-key, else APET_API_KEY (kept out of ps); an empty --api-key is refused; the key
    never shows in the config's repr (logs) nor in --help."""
    from apet.cli import main

    assert KEY not in repr(ServeConfig(artifact=artifact, api_key=KEY))
    with pytest.raises(UsageError, match="--api-key"):
        ServeConfig(artifact=artifact, api_key=" ")

    seen: list[ServeConfig] = []
    monkeypatch.setattr("apet.serve.server.serve", lambda config, app=None: seen.append(config))
    monkeypatch.setenv("APET_API_KEY", KEY)
    assert main(["serve", str(artifact)]) == 0
    assert main(["serve", str(artifact), "--api-key", "sk-flag"]) == 0
    monkeypatch.setenv("APET_API_KEY", "")
    assert main(["serve", str(artifact)]) == 0
    assert [c.api_key for c in seen] == [KEY, "sk-flag", None]
    assert main(["serve", str(artifact), "--api-key", ""]) == 2
    assert "--api-key" in capsys.readouterr().err
    monkeypatch.setenv("APET_API_KEY", KEY)
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert KEY not in capsys.readouterr().out


def test_serving_every_interface_without_a_key_warns(artifact, monkeypatch, caplog) -> None:
    from apet.serve import server as server_module

    class Stop(Exception):
        pass

    def stop(*args: Any, **kwargs: Any) -> None:
        raise Stop

    app = create_app(Pipeline.load(artifact, backend="onnxruntime", threads=1),
                     ServeConfig(artifact=artifact, model_name="tiny-llava"))
    monkeypatch.setattr("uvicorn.Server.run", stop)
    for host, key, warned in (("0.0.0.0", None, True), ("127.0.0.1", None, False), ("0.0.0.0", KEY, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="apet.serve.server"), pytest.raises(Stop):
            server_module.serve(ServeConfig(artifact=artifact, host=host, port=0, api_key=key), app=app)
        assert ("without an API key" in caplog.text) is warned, (host, key)


def test_cli_serve_refuses_a_batch_larger_than_the_artifact(artifact, capsys) -> None:
    from apet.cli import main

    assert main(["serve", str(artifact), "--backend", "onnxruntime", "--max-batch", "64"]) == 2
    assert "max_batch" in capsys.readouterr().err


def test_cli_serve_takes_the_onnxruntime_forms_apet_run_takes(artifact, capsys, monkeypatch) -> None:
    """apet-serve hands apet-run's ONNX Runtime flags (CUDA graphs, decode attention, graph rewrites such as
    share-weights) to the pipeline it serves; an unknown rewrite is one line naming the flag, before any load."""
    from apet.cli import main

    class Loaded(Exception):
        pass

    seen: dict[str, Any] = {}

    def load(*args: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(Pipeline, "load", load)
    with pytest.raises(Loaded):
        main(["serve", str(artifact), "--backend", "onnxruntime", "--port", "0", "--no-cuda-graphs",
              "--decode-attention", "gqa", "--ort-rewrites", "default,share-weights"])
    assert seen["cuda_graphs"] is False and seen["decode_attention"] == "gqa"
    assert seen["ort_rewrites"] == "default,share-weights" and seen["backend"] == "onnxruntime"
    seen.clear()
    assert main(["serve", str(artifact), "--backend", "onnxruntime", "--port", "0", "--ort-rewrites", "pack"]) == 2
    assert not seen
    err = capsys.readouterr().err
    assert err.startswith("error: --ort-rewrites: unknown ONNX Runtime graph rewrite 'pack'") and "share-weights" in err


def test_cli_serve_on_a_busy_port_says_so_before_loading(artifact, capsys, monkeypatch) -> None:
    """One line naming --port, exit 2, and neither the banner nor a model load before it."""
    import socket

    from apet.cli import main

    def load(*args: Any, **kwargs: Any) -> None:
        pytest.fail("apet-serve loaded the model before checking its port")

    monkeypatch.setattr(Pipeline, "load", load)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        assert main(["serve", str(artifact), "--backend", "onnxruntime", "--port", str(port)]) == 2
    finally:
        busy.close()
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: --port {port} is already in use on 127.0.0.1 — pick another --port, or "
                                "stop the program listening there (ss -ltnp shows it)"]


def test_stop_holdback_streams_what_the_answer_keeps() -> None:
    text, stops = "hello wor|ld STOP here", ("STOP", "ld X")
    holdback = StopHoldback(stops)
    streamed = "".join(holdback.push(c) for c in text)
    assert streamed == "hello wor|ld "
    assert holdback.finish("hello wor|ld ") == ""
    holdback = StopHoldback(("abc",))
    assert holdback.push("xxab") == "xx" and holdback.finish("xxab") == "ab"


# -- the pipeline's per-row configs and cancellation (what batching relies on) -----------------------
def test_generate_batch_per_row_configs_and_cancel(reference) -> None:
    images = [encode(make_image(20 + i)) for i in range(3)]
    prompts = ["What is this?", "Describe the image.", "Colors?"]
    configs = [GenerationConfig(3), GenerationConfig(7, temperature=0.7, seed=5), GenerationConfig(5)]
    alone = [reference.generate_batch([i], [p], [c])[0] for i, p, c in zip(images, prompts, configs)]
    together = reference.generate_batch(images, prompts, configs)
    for a, b in zip(alone, together):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
    assert [len(r.token_ids) for r in together] == [3, 7, 5]
    steps: list[int] = []

    def cancelled(row: int) -> bool:
        steps.append(row)
        return row == 1 and steps.count(1) > 2

    rows = reference.generate_batch(images, prompts, GenerationConfig(6), cancelled=cancelled)
    assert rows[1].finish_reason == "cancelled" and len(rows[1].token_ids) == 2
    assert [len(rows[0].token_ids), len(rows[2].token_ids)] == [6, 6]


# -- bounded load test (loopback only) ---------------------------------------------------------------
LOAD_REQUESTS, LOAD_CLIENTS, RSS_GROWTH_BOUND_MB = 200, 8, 48


def test_load_200_requests_from_8_clients(batch_server, reference) -> None:
    """200 requests (8 tokens each, streaming and not, 8 distinct images) from 8 keep-alive clients: no
    errors, every answer right, no request object alive afterwards, and the process's resident memory
    (the server lives in this process) grows by less than the bound after a warm-up — keeping each
    request's decoded 448x336 image alone would add ~86 MiB. Figures are printed for the README."""
    import gc

    import psutil

    from apet.serve.scheduler import Job

    images = [encode(make_image(40 + i, (448, 336))) for i in range(8)]
    expected = [reference.generate(image, PROMPT, max_new_tokens=8).token_ids for image in images]

    def client(worker: int, count: int) -> list[float]:
        latencies = []
        with httpx.Client(base_url=batch_server.url, timeout=60) as http:
            for i in range(count):
                k = (worker + i) % len(images)
                body = chat_body(images[k], stream=bool(i % 2))
                start = time.perf_counter()
                if body["stream"]:
                    with http.stream("POST", "/v1/chat/completions", json=body) as response:
                        assert response.status_code == 200
                        last = [line for line in response.iter_lines() if line.startswith("data: {")][-1]
                    ids = json.loads(last[6:])["apet"]["token_ids"]
                else:
                    response = http.post("/v1/chat/completions", json=body)
                    assert response.status_code == 200, response.text
                    ids = response.json()["apet"]["token_ids"]
                latencies.append(time.perf_counter() - start)
                assert ids == expected[k]
        return latencies

    def run(total: int) -> list[float]:
        with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
            parts = pool.map(client, range(LOAD_CLIENTS), [total // LOAD_CLIENTS] * LOAD_CLIENTS)
            return sorted(x for part in parts for x in part)

    process = psutil.Process()
    run(4 * LOAD_CLIENTS)  # warm-up: arenas, ORT's per-shape allocations, connection pools
    before = process.memory_info().rss
    start = time.perf_counter()
    latencies = run(LOAD_REQUESTS)
    seconds = time.perf_counter() - start
    growth_mb = (process.memory_info().rss - before) / (1 << 20)
    metrics = httpx.get(f"{batch_server.url}/metrics").text
    errors = [line for line in metrics.splitlines() if line.startswith("apet_request_errors_total")]
    print(f"\nload: {LOAD_REQUESTS} requests from {LOAD_CLIENTS} clients in {seconds:.1f} s "
          f"({LOAD_REQUESTS / seconds:.1f} req/s), latency p50 {latencies[len(latencies) // 2] * 1e3:.0f} ms "
          f"p95 {latencies[int(0.95 * len(latencies))] * 1e3:.0f} ms, RSS growth {growth_mb:+.1f} MiB")
    assert len(latencies) == LOAD_REQUESTS
    assert not errors, errors
    assert growth_mb < RSS_GROWTH_BOUND_MB
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Job], "requests outlived their answers"


def test_video_parts_become_temporary_files() -> None:
    """Video families read files: a video_url data URL becomes a temp file that lives as long as the request."""
    from apet.serve.errors import ApiError
    from apet.serve.media import MediaLimits, resolve

    limits = MediaLimits(1 << 20, 1000)
    media = resolve("video", data_url(b"\0\0\0\x18ftypmp42", "video/mp4"), limits, "video_url.url")
    assert media.kind == "video" and media.value.suffix == ".mp4" and media.value.read_bytes()[4:8] == b"ftyp"
    path = media.value
    media.close()
    assert not path.exists()
    with pytest.raises(ApiError, match="video/x-flv"):
        resolve("video", data_url(b"FLV", "video/x-flv"), limits, "video_url.url")
