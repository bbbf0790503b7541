"""A bounded load test against a running apet-serve (run by hand; loopback by default):

  apet-serve out/llava-apet --backend tensorrt --max-batch 4 &
  python scripts/serve_load.py --image cat.jpg --requests 200 --clients 8 --max-tokens 64

Sends ``--requests`` chat completions (every other one streamed) from ``--clients`` threads, each with a
keep-alive connection, then prints throughput, latency percentiles, the server's TTFT and decode speed
(from the ``apet`` extension), errors, and the server's resident memory before/after (from /metrics).
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx


def rss_mb(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("process_resident_memory_bytes"):
            return float(line.split()[-1]) / (1 << 20)
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", default="Describe the image.")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    mime = mimetypes.guess_type(args.image)[0] or "image/png"
    with open(args.image, "rb") as file:
        url = f"data:{mime};base64,{base64.b64encode(file.read()).decode()}"
    model = httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": args.prompt}, {"type": "image_url", "image_url": {"url": url}}]}]}

    def client(count: int) -> list[tuple[float, dict | None]]:
        out = []
        with httpx.Client(base_url=args.url, timeout=600) as http:
            for i in range(count):
                start = time.perf_counter()
                if i % 2:
                    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                        data = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
                    apet = json.loads(data[-1]).get("apet") if response.status_code == 200 and data else None
                else:
                    response = http.post("/v1/chat/completions", json=body)
                    apet = response.json().get("apet") if response.status_code == 200 else None
                out.append((time.perf_counter() - start, apet))
        return out

    before = rss_mb(args.url)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        shares = [args.requests // args.clients + (i < args.requests % args.clients) for i in range(args.clients)]
        results = [r for part in pool.map(client, shares) for r in part]
    seconds = time.perf_counter() - start
    ok = [apet for _, apet in results if apet is not None]
    latency = sorted(t for t, _ in results)
    print(f"{len(results)} requests from {args.clients} clients in {seconds:.1f} s: {len(results) / seconds:.2f} "
          f"req/s, {len(results) - len(ok)} errors")
    print(f"latency p50 {latency[len(latency) // 2]:.3f} s, p95 {latency[int(0.95 * len(latency))]:.3f} s")
    if ok:
        print(f"TTFT median {statistics.median(a['ttft_ms'] for a in ok):.1f} ms, decode median "
              f"{statistics.median(a['decode_tokens_per_s'] for a in ok):.1f} tokens/s per request, "
              f"batch sizes {sorted({a['batch'] for a in ok})}")
    print(f"server RSS {before:.0f} -> {rss_mb(args.url):.0f} MiB")


if __name__ == "__main__":
    main()
