"""Capture a function of static-shaped tensors once as a CUDA graph and replay it.

Off CUDA (or with ``enabled=False``) the function simply runs, so the same code
path is exercised by the CPU tests.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class GraphedCall:
    """``fn(**inputs)`` as a CUDA graph over static input buffers; call with new tensors of the same shapes."""

    def __init__(self, fn: Callable[..., Any], example: dict[str, torch.Tensor], *, enabled: bool = True,
                 pool: Any = None, warmup: int = 2, before_capture: Callable[[], None] | None = None) -> None:
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs = {k: v.clone() for k, v in example.items()}
        device = next(iter(example.values())).device
        if not (enabled and device.type == "cuda"):
            return
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(**self.inputs)
        torch.cuda.current_stream(device).wait_stream(stream)
        if before_capture is not None:
            before_capture()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(**self.inputs)

    def __call__(self, **inputs: torch.Tensor) -> Any:
        if self.graph is None:
            return self.fn(**inputs)
        for name, value in inputs.items():
            self.inputs[name].copy_(value, non_blocking=True)
        self.graph.replay()
        return self.output
