"""How long a short GPU call takes on the device, as it runs inside a decode step's CUDA graph.

Why: the skinny-matmul dispatcher (:mod:`apet.kernels.gemv`) picks the fastest of cuBLAS and its kernel
configurations by measuring them. Timed as eager launches in a loop, a 10 µs kernel measured its launch: Triton's
Python launch costs more than cuBLAS's, so the kernel lost where it was faster on the device (the H200's o
projection measured 23–26 µs for a 33 MB read, 1.4 TB/s). And a weight read again and again comes from the L2
cache (50 MB on an H200), which a decode step never finds warm. Here the call runs ``repeats`` times in one
captured CUDA graph, after a read of twice the L2 cache each time (timed alone in its own graph and subtracted).
"""

from __future__ import annotations

from typing import Callable

import torch


def captured(body: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """``body`` captured in a CUDA graph after one warm-up call on a side stream (as ``torch.cuda.graph`` asks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capturing stream, as torch.cuda.graph asks
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def _replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


class ColdTimer:
    """Times calls on one CUDA device with the L2 cache flushed before each (one flush buffer per timer)."""

    def __init__(self, device: torch.device, repeats: int = 20, trials: int = 3) -> None:
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        self.flush = torch.empty(max(2 * l2, 1 << 20) // 4, dtype=torch.float32, device=device).fill_(1.0)
        self.repeats, self.trials = repeats, trials
        self._flush_graph = captured(self._flushes)
        self.flush_ms = min(_replay_ms(self._flush_graph) for _ in range(trials))

    def _flushes(self) -> None:
        for _ in range(self.repeats):
            self.flush.sum()

    def ms(self, fn: Callable[[], object]) -> float:
        """Device milliseconds of one ``fn()`` with a cold L2 (the best of ``trials`` graph replays)."""
        torch.cuda.synchronize()

        def body() -> None:
            for _ in range(self.repeats):
                self.flush.sum()
                fn()

        graph = captured(body)
        best = min(_replay_ms(graph) for _ in range(self.trials))
        del graph
        return max(best - self.flush_ms, 0.0) / self.repeats
