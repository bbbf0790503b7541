"""apet-serve and Triton Inference Server under the same load, in one run, on one artifact (docs/triton.md):

  python scripts/serve_vs_triton.py --triton-venv .venv-ci-triton --out docs/benchmarks/serve-vs-triton-cpu.json

Both servers run on loopback, each with its defaults for one device: apet-serve (ONNX Runtime, one request decoded
at a time: --max-batch 1) and tritonserver (the nvidia-pytriton bundle, Python backend) over ``apet triton``'s
repository (vision model in its Python/ONNX Runtime form, one instance of each model). The same client program
(run in the Triton environment, which has tritonclient[grpc]) sends the same requests to both: ``--clients``
threads, each with one keep-alive connection (HTTP for apet-serve, one gRPC stream for Triton), each sending
``--requests`` requests for the same image and prompt, whole answers (no streaming). Rounds alternate servers
(serve, triton, serve, ...) after a warm-up, so background load on the machine falls on both. Every answer's
greedy tokens are checked against ``Pipeline.generate`` of the same artifact.

The client half runs as ``serve_vs_triton.py client ...`` (one JSON line on stdout).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PROMPT = "What is in the picture?"
MODEL_NAME = "apet"


# -- the client half (runs in the Triton environment: tritonclient[grpc], numpy<2, no torch) ---------------------
def _serve_session(port: int, image: bytes, prompt: str, max_tokens: int) -> tuple[Callable[[], list[int]], Callable]:
    import http.client

    url = "data:image/png;base64," + base64.b64encode(image).decode()
    body = json.dumps({"model": MODEL_NAME, "max_tokens": max_tokens, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "text", "text": prompt},
                                     {"type": "image_url", "image_url": {"url": url}}]}]})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def ask() -> list[int]:
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        return json.loads(data)["apet"]["token_ids"]

    return ask, connection.close


def _triton_session(port: int, image: bytes, prompt: str, max_tokens: int) -> tuple[Callable[[], list[int]],
                                                                                     Callable]:
    import numpy as np
    import tritonclient.grpc as grpc

    tensors = []
    for name, value, dtype in (("prompt", np.array([prompt.encode()], dtype=np.object_), "BYTES"),
                               ("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32"),
                               ("stream", np.array([False]), "BOOL"),
                               ("image", np.array([image], dtype=np.object_), "BYTES")):
        tensor = grpc.InferInput(name, [1], dtype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    answers: queue.Queue = queue.Queue()
    client = grpc.InferenceServerClient(f"127.0.0.1:{port}")
    client.start_stream(callback=lambda result, error: answers.put(error or result))

    def ask() -> list[int]:
        client.async_stream_infer("apet_generate", tensors, enable_empty_final_response=True)
        tokens = None
        while True:
            item = answers.get(timeout=600)
            if isinstance(item, Exception):
                raise RuntimeError(str(item))
            if item.as_numpy("token_ids") is not None:
                tokens = item.as_numpy("token_ids").tolist()
            if item.get_response().parameters["triton_final_response"].bool_param:
                return tokens

    def close() -> None:
        client.stop_stream()
        client.close()

    return ask, close


def run_clients(target: str, port: int, image: bytes, prompt: str, clients: int, requests: int,
                max_tokens: int) -> dict[str, Any]:
    """``clients`` threads, each ``requests`` requests on its own connection, started together; wall time from the
    start to the last answer."""
    session = {"serve": _serve_session, "triton": _triton_session}[target]
    start_line = threading.Barrier(clients + 1)
    results: list[tuple[float, list[int] | None, str | None]] = []
    lock = threading.Lock()

    def client() -> None:
        ask, close = session(port, image, prompt, max_tokens)
        start_line.wait()
        try:
            for _ in range(requests):
                start = time.perf_counter()
                try:
                    tokens, error = ask(), None
                except Exception as exc:  # noqa: BLE001 - counted and reported, the load goes on
                    tokens, error = None, str(exc)
                with lock:
                    results.append((time.perf_counter() - start, tokens, error))
        finally:
            close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start_line.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    answers = sorted({json.dumps(tokens) for _, tokens, error in results if error is None})
    return {"wall_s": wall, "latencies_s": [r[0] for r in results], "errors": [r[2] for r in results if r[2]],
            "distinct_token_ids": [json.loads(a) for a in answers]}


def client_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="serve_vs_triton.py client")
    parser.add_argument("--target", choices=("serve", "triton"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--max-tokens", type=int, default=6)
    args = parser.parse_args(argv)
    print(json.dumps(run_clients(args.target, args.port, args.image.read_bytes(), args.prompt, args.clients,
                                 args.requests, args.max_tokens)))


# -- the orchestrating half (this environment: apet with export and serve) ------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class ApetServe:
    """``apet-serve ARTIFACT`` (ONNX Runtime, CPU) on 127.0.0.1, from this environment."""

    def __init__(self, artifact: Path, log: Path) -> None:
        from triton_local import free_port

        self.port = free_port()
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "apet.cli", "serve", str(artifact), "--host", "127.0.0.1", "--port",
             str(self.port), "--backend", "onnxruntime", "--served-model-name", MODEL_NAME],
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self, timeout: float = 120) -> bool:
        from triton_local import wait_ready

        return wait_ready(f"http://127.0.0.1:{self.port}/health", self.process, timeout, poll=0.3)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _tiny_artifact(out: Path) -> Path:
    """The tiny LLaVA at ratio 0.11, two stages, fp32: the artifact of tests/test_triton_server.py."""
    from apet.adapters.llava.tiny import create_tiny_llava
    from apet.export.artifact import ExportConfig, export_artifact

    checkpoint = create_tiny_llava(out.parent / "tiny-llava", seed=0)
    export_artifact(ExportConfig(model=str(checkpoint), out=out, ratio=0.11, stages=2, dtype="fp32"))
    return out


def _load(venv: Path, target: str, port: int, image: Path, args: argparse.Namespace, clients: int,
          requests: int) -> dict[str, Any]:
    command = [str(venv / "bin" / "python"), __file__, "client", "--target", target, "--port", str(port),
               "--image", str(image), "--prompt", args.prompt, "--clients", str(clients), "--requests", str(requests),
               "--max-tokens", str(args.max_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600,
                          env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")})
    if done.returncode != 0:
        raise RuntimeError(f"the {target} client failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def _summary(load: dict[str, Any], expected: list[int]) -> dict[str, Any]:
    latencies = load["latencies_s"]
    return {"requests": len(latencies), "wall_s": round(load["wall_s"], 3),
            "requests_per_s": round(len(latencies) / load["wall_s"], 2),
            "p50_s": round(percentile(latencies, 0.50), 4), "p95_s": round(percentile(latencies, 0.95), 4),
            "mean_s": round(statistics.fmean(latencies), 4), "errors": len(load["errors"]),
            "first_error": load["errors"][0] if load["errors"] else None,
            "answers_equal_pipeline": load["distinct_token_ids"] == [expected]}


def compare(artifact: Path, venv: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from triton_local import TritonServer

    from apet.runtime.pipeline import Pipeline
    from apet.triton.repository import write_repository

    expected = Pipeline.load(artifact, backend="onnxruntime").generate(str(args.image), args.prompt,
                                                                       max_new_tokens=args.max_tokens).token_ids
    write_repository(artifact, work / "repo", vision_form="python")
    triton = TritonServer(venv, work / "repo", work)
    serve = ApetServe(artifact, work / "apet-serve.log")
    try:
        if not serve.ready():
            raise RuntimeError(f"apet-serve did not start:\n{serve.log.read_text()[-3000:]}")
        if not triton.ready():
            raise RuntimeError(f"tritonserver did not start:\n{triton.log.read_text()[-3000:]}")
        ports = {"apet-serve": ("serve", serve.port), "triton": ("triton", triton.grpc)}
        for name, (target, port) in ports.items():  # warm-up: sessions, kernels, the Python backend's stub
            _load(venv, target, port, args.image, args, min(2, args.clients), 2)
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in ports}
        load_average = [os.getloadavg()]
        for _ in range(args.rounds):
            for name, (target, port) in ports.items():
                rounds[name].append(_summary(_load(venv, target, port, args.image, args, args.clients,
                                                   args.requests), expected))
                load_average.append(os.getloadavg())
    finally:
        serve.stop()
        triton.stop()
    servers = {name: {"rounds": runs,
                      "median_requests_per_s": round(statistics.median(r["requests_per_s"] for r in runs), 2),
                      "median_p95_s": round(statistics.median(r["p95_s"] for r in runs), 4)}
               for name, runs in rounds.items()}
    return {"servers": servers, "expected_token_ids": expected, "load_average_1_5_15": load_average}


def _environment(venv: Path) -> dict[str, Any]:
    import onnxruntime

    probe = ("import importlib.metadata as m, onnxruntime; print(m.version('nvidia-pytriton'), "
             "onnxruntime.__version__)")
    pytriton, triton_ort = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True,
                                          text=True, check=True).stdout.split()
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "triton_env_onnxruntime": triton_ort,
            "nvidia_pytriton": pytriton, "device": "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, help="default: the tiny LLaVA (ratio 0.11, two stages, fp32)")
    parser.add_argument("--triton-venv", type=Path, default=os.environ.get("APET_TRITON_VENV"),
                        help="environment with nvidia-pytriton, tritonclient[grpc] and apet (default: "
                             "$APET_TRITON_VENV; .ci/run builds one)")
    parser.add_argument("--image", type=Path, default=ROOT / "apet" / "assets" / "demo.png")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per server, alternating")
    parser.add_argument("--out", type=Path, help="write the result JSON here")
    args = parser.parse_args()
    if args.triton_venv is None or not (args.triton_venv / "bin" / "python").is_file():
        parser.error("--triton-venv (or APET_TRITON_VENV) must name an environment with nvidia-pytriton")
    with tempfile.TemporaryDirectory(prefix="apet-serve-vs-triton-") as scratch:
        work = Path(scratch)
        artifact = args.artifact or _tiny_artifact(work / "artifact")
        result = {"what": "apet-serve vs tritonserver, same artifact, same client program and load, one run",
                  "environment": _environment(args.triton_venv),
                  "load": {"clients": args.clients, "requests_per_client": args.requests,
                           "max_tokens": args.max_tokens, "prompt": args.prompt, "image": args.image.name,
                           "streaming": False, "rounds": args.rounds},
                  "artifact": "tiny LLaVA, ratio 0.11, two stages, fp32" if args.artifact is None else str(artifact),
                  **compare(artifact, args.triton_venv, work, args)}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    for name, server in result["servers"].items():
        print(f"{name}: {server['median_requests_per_s']} requests/s, p95 {server['median_p95_s']} s "
              f"(rounds: {[r['requests_per_s'] for r in server['rounds']]} requests/s)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        client_main(sys.argv[2:])
    else:
        main()
