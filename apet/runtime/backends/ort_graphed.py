"""ONNX Runtime runs at fixed shapes with every input and output bound once to a device buffer, so the CUDA execution
provider can replay them as a CUDA graph (``enable_cuda_graph``: it captures after its warm-up runs and from then on
replays the launches at the same addresses). The vision graph takes it where the artifact fixes every dim but the
batch (LLaVA-1.5: one 336² image per row, ApET's budget K): its ~800 launches per image become one, which is most of
the vision run's host time (docs/benchmarks.md, "ONNX Runtime CUDA on the static-KV form").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from apet.runtime.backends.ort_static import SessionSetup

log = logging.getLogger(__name__)
BATCH_DIM = "batch"  # the one symbolic dim a graphed session fixes (a free-dimension override)


def fixed_shapes(specs: list[dict], batch: int) -> dict[str, tuple[tuple[int, ...], Any]] | None:
    """Manifest IO specs -> {name: (shape, numpy dtype)} at ``batch``; None where another dim is symbolic."""
    shapes = {}
    for spec in specs:
        dims = [batch if dim == BATCH_DIM else dim for dim in spec["shape"]]
        if not all(isinstance(dim, int) for dim in dims):
            return None
        shapes[spec["name"]] = (tuple(dims), np.dtype(spec["dtype"]).type)
    return shapes


class FixedRun:
    """One session at fixed shapes: inputs refilled in place, outputs read back from their bound buffers."""

    def __init__(self, session: Any, setup: SessionSetup, inputs: dict[str, tuple[tuple, Any]],
                 outputs: dict[str, tuple[tuple, Any]]) -> None:
        new = setup.ort.OrtValue.ortvalue_from_shape_and_type
        self.session = session
        self.inputs = {name: new(list(shape), kind, setup.device_type, 0) for name, (shape, kind) in inputs.items()}
        self.outputs = {name: new(list(shape), kind, setup.device_type, 0) for name, (shape, kind) in outputs.items()}
        self.binding = session.io_binding()
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in arrays.items():
            self.inputs[name].update_inplace(np.ascontiguousarray(array))
        self.session.run_with_iobinding(self.binding)
        return {name: value.numpy() for name, value in self.outputs.items()}


class GraphedVision:
    """The vision graph per batch size as a CUDA-graph session (:class:`FixedRun`). A batch whose session ONNX
    Runtime refuses to capture (a node it would place on the CPU) is remembered and runs ungraphed."""

    def __init__(self, path: Path, graph_spec: Any, setup: SessionSetup) -> None:
        self.path, self.spec, self.setup = path, graph_spec, setup
        self.runs: dict[int, FixedRun | None] = {}

    @classmethod
    def of(cls, path: Path, graph_spec: Any, setup: SessionSetup) -> "GraphedVision | None":
        """Where it applies: CUDA graphs asked for on the CUDA execution provider, every dim fixed but the batch."""
        if not (setup.cuda_graphs and setup.device_type == "cuda"):
            return None
        if fixed_shapes(graph_spec.inputs, 1) is None or fixed_shapes(graph_spec.outputs, 1) is None:
            log.info("vision runs without a CUDA graph: its inputs or outputs have dims besides the batch")
            return None
        return cls(path, graph_spec, setup)

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The vision outputs by name, or None where this batch size cannot be graphed (run it ungraphed)."""
        batch = int(next(iter(feed.values())).shape[0])
        if batch not in self.runs:
            self.runs[batch] = self._run(batch)
        run = self.runs[batch]
        return None if run is None else run(feed)

    def _run(self, batch: int) -> FixedRun | None:
        try:
            session = self.setup.session(self.path, batch)
        except Exception as err:  # noqa: BLE001 - ONNX Runtime refuses capture with an untyped Fail
            log.warning("vision at batch %d runs without a CUDA graph: %s", batch, str(err).splitlines()[0])
            return None
        return FixedRun(session, self.setup, fixed_shapes(self.spec.inputs, batch),
                        fixed_shapes(self.spec.outputs, batch))
