"""Prometheus metrics, one registry per app (several servers in one process — tests — never collide).

Exposed at ``GET /metrics`` in the Prometheus text format: request and error counts by route, TTFT (queue
wait included) and decode-speed histograms, tokens in and out, queue length, running requests, batch
sizes, the process's memory (``process_*``, Linux) and — where the backend runs on a CUDA device — the
device's memory in use and the backend's peak.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DECODE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class GpuMemoryCollector(Collector):
    """Device memory of a CUDA backend, read only when torch is already loaded and CUDA initialised (the
    TensorRT and torch backends); reports nothing on a CPU backend rather than a misleading zero."""

    def __init__(self, device: str | None, peak: Callable[[], int | None]) -> None:
        self.device, self.peak = device, peak

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not self.device or not self.device.startswith("cuda"):
            return
        peak = self.peak()
        if peak is not None:
            yield GaugeMetricFamily("apet_device_memory_peak_bytes", "peak device memory the backend allocated",
                                    value=float(peak))
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            free, total = torch.cuda.mem_get_info(torch.device(self.device))
            yield GaugeMetricFamily("apet_gpu_memory_used_bytes", "device memory in use (all processes)",
                                    value=float(total - free))
            yield GaugeMetricFamily("apet_gpu_memory_total_bytes", "device memory", value=float(total))


class Metrics:
    def __init__(self, *, queue_length: Callable[[], float], running: Callable[[], float], device: str | None,
                 peak_memory: Callable[[], int | None]) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("apet_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=registry)
        self.errors = Counter("apet_request_errors", "requests answered with an error, by route and code",
                              ["route", "code"], registry=registry)
        self.ttft = Histogram("apet_ttft_seconds", "time to first token, queue wait included", buckets=TTFT_BUCKETS,
                              registry=registry)
        self.decode = Histogram("apet_decode_tokens_per_second", "decode speed per request", buckets=DECODE_BUCKETS,
                                registry=registry)
        self.duration = Histogram("apet_request_duration_seconds", "chat completion time, arrival to last token",
                                  buckets=TTFT_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("apet_prompt_tokens", "prompt tokens (visual included)", registry=registry)
        self.visual_tokens = Counter("apet_visual_tokens", "visual tokens the LLM saw after ApET", registry=registry)
        self.completion_tokens = Counter("apet_completion_tokens", "tokens generated", registry=registry)
        self.batch = Histogram("apet_batch_size", "requests decoded together", buckets=BATCH_BUCKETS,
                               registry=registry)
        Gauge("apet_queue_length", "requests waiting for the worker", registry=registry).set_function(queue_length)
        Gauge("apet_running_requests", "requests being generated", registry=registry).set_function(running)
        ProcessCollector(registry=registry)
        registry.register(GpuMemoryCollector(device, peak_memory))

    def observe(self, usage: dict[str, Any], apet: dict[str, Any], seconds: float) -> None:
        self.ttft.observe(apet["ttft_ms"] / 1e3)
        if usage["completion_tokens"] > 1:
            self.decode.observe(apet["decode_tokens_per_s"])
        self.duration.observe(seconds)
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.visual_tokens.inc(usage["visual_tokens"])
        self.completion_tokens.inc(usage["completion_tokens"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
