"""Run in the Triton test's own environment (APET_TRITON_VENV: nvidia-pytriton, tritonclient, numpy<2): sends
requests to apet_generate over gRPC and prints one JSON line per answer (tests/test_triton_server.py reads them).

usage: python triton_client.py PORT REQUESTS.json [CLIENTS]; each request {prompt, image|video (a file path),
max_tokens, stream}; with CLIENTS, every client thread sends every request.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpc


def inputs(request: dict) -> list:
    items = [("prompt", np.array([request["prompt"].encode()], dtype=np.object_), "BYTES"),
             ("max_tokens", np.array([request["max_tokens"]], dtype=np.int32), "INT32"),
             ("stream", np.array([bool(request.get("stream"))]), "BOOL")]
    for kind in ("image", "video"):
        if kind in request:
            items.append((kind, np.array([Path(request[kind]).read_bytes()], dtype=np.object_), "BYTES"))
    tensors = []
    for name, value, dtype in items:
        tensor = grpc.InferInput(name, [1], dtype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def ask(port: int, request: dict) -> dict:
    answers: queue.Queue = queue.Queue()
    client = grpc.InferenceServerClient(f"127.0.0.1:{port}")
    client.start_stream(callback=lambda result, error: answers.put(error or result))
    start = time.perf_counter()
    try:
        client.async_stream_infer("apet_generate", inputs(request), enable_empty_final_response=True)
        record: dict = {"pieces": []}
        while True:
            item = answers.get(timeout=60)
            if isinstance(item, Exception):
                return {"error": str(item), "seconds": time.perf_counter() - start}
            if item.as_numpy("text") is not None:
                record["pieces"].append(item.as_numpy("text")[0].decode())
            if item.as_numpy("token_ids") is not None:
                record["token_ids"] = item.as_numpy("token_ids").tolist()
                record["keep_index"] = item.as_numpy("keep_index").tolist()
            if item.get_response().parameters["triton_final_response"].bool_param:
                record["seconds"] = time.perf_counter() - start
                return record
    finally:
        client.stop_stream()
        client.close()


def main() -> None:
    port, requests = int(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    clients = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    if not clients:
        for request in requests:
            print(json.dumps(ask(port, request)), flush=True)
        return
    results: list = []
    lock = threading.Lock()

    def client() -> None:
        for request in requests:
            answer = ask(port, request)
            with lock:
                results.append(answer)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for answer in results:
        print(json.dumps(answer))


if __name__ == "__main__":
    main()
