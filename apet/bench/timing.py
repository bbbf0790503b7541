"""Timing primitives shared by every benchmark: device events on CUDA, perf_counter on CPU."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds over repeats after warm-up."""

    median_ms: float
    p90_ms: float
    min_ms: float
    repeats: int

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def summarize(samples_ms: list[float]) -> Timing:
    ordered = sorted(samples_ms)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return Timing(statistics.median(ordered), p90, ordered[0], len(ordered))


def time_call(fn: Callable[[], Any], *, device: torch.device | str, warmup: int = 3, repeats: int = 10) -> Timing:
    """Median/p90 of ``fn()``; CUDA work is timed with events around each call (no host clock)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)
