"""Timing primitives shared by every benchmark: device events on CUDA, perf_counter on CPU.

Every timing keeps the spread of its repeats (p10 and p90 next to the median): on a loaded machine the
median alone can be off by a factor of several with nothing to show it. :data:`NOISY_SPREAD` is where
apet-bench starts warning: a p90 more than 1.5x the median means at least one repeat in ten ran 50%
slower than the typical one, more than clock boost or cache effects explain on an idle machine.
"""

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
    p10_ms: float = 0.0

    @property
    def spread(self) -> float:
        """p90 / median: 1.0 for perfectly steady repeats."""
        return self.p90_ms / self.median_ms if self.median_ms > 0 else 1.0

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


NOISY_SPREAD = 1.5  # p90 / median above which a timing is reported as noisy (module docstring)


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted samples (no interpolation: a reported value was measured)."""
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(samples_ms: list[float]) -> Timing:
    ordered = sorted(samples_ms)
    return Timing(statistics.median(ordered), _percentile(ordered, 0.9), ordered[0], len(ordered),
                  _percentile(ordered, 0.1))


def noisy_timings(timings: dict[str, dict[str, Any]], limit: float = NOISY_SPREAD) -> dict[str, float]:
    """{name: p90/median} of the JSON timings (``Timing.to_json``) whose spread exceeds ``limit``."""
    return {name: round(t["p90_ms"] / t["median_ms"], 2) for name, t in timings.items()
            if t and t.get("median_ms", 0) > 0 and t["p90_ms"] / t["median_ms"] > limit}


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
