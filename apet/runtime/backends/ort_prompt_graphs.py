"""The rewritten prefill (GroupQueryAttention over the prompt, :mod:`.ort_gqa`) replayed as CUDA graphs: one per
prompt shape, all in the one prefill session.

Why: ONNX Runtime launches the rewritten prefill's ~900 kernels one by one from the host, 9.3 ms wall for 6.5 ms of
GPU work at LLaVA-1.5-7B shapes (docs/benchmarks.md, "The prompt rewritten too, its CUDA graph refused"). Its length
follows the prompt, so it cannot be a fixed-shape session like the decode step (each such session holds its own copy
of the weights); ONNX Runtime instead keeps several graphs in one session, each picked by a ``gpu_graph_id`` and valid
at the shapes it was captured at. The torch path does the same per padded length (``bucket``); here a shape is the
prompt's exact length, which a fixed prompt template keeps constant (a camera loop asking the same question).

A shape's first prefill runs uncaptured and gives its output shapes; from then on it runs bound once
(:class:`~apet.runtime.backends.ort_session.FixedRun`: ONNX Runtime warms up, captures, then replays). At most
``limit`` shapes get a graph, first come; later ones run uncaptured. The inputs a kernel reads on the host
(GroupQueryAttention's total length) are part of the shape: a graph bakes their values in.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from apet.runtime.backends.ort_session import UNCAPTURED, FixedRun, SessionSetup

log = logging.getLogger(__name__)
MAX_PROMPT_GRAPHS = 8  # graphs per session: each keeps its bound inputs and ONNX Runtime's captured launches


def shape_key(device: dict[str, np.ndarray], host: dict[str, np.ndarray]) -> tuple:
    """What a captured graph is valid for: every device input's shape and type, every host input's value."""
    return (tuple((name, value.shape, value.dtype.str) for name, value in sorted(device.items())),
            tuple((name, value.dtype.str, value.tobytes()) for name, value in sorted(host.items())))


class PromptGraphs:
    """The bound, captured prefill runs of one session (created with ``shape_graphs``), by :func:`shape_key`."""

    def __init__(self, session: Any, setup: SessionSetup, limit: int = MAX_PROMPT_GRAPHS,
                 bound: dict[str, Any] | None = None, on_device: frozenset[str] = frozenset()) -> None:
        self.session, self.setup, self.limit = session, setup, limit
        self.bound = bound or {}  # OrtValues every run binds as they are (the weights of share-weights)
        self.on_device = on_device  # outputs a bound run returns as OrtValues, not read back (FixedRun)
        self.runs: dict[tuple, FixedRun | None] = {}  # None: ONNX Runtime failed to capture this shape
        self.uncaptured = setup.run_options(UNCAPTURED)

    def run(self, device: dict[str, np.ndarray], host: dict[str, np.ndarray]) -> dict[str, Any] | None:
        """The outputs by name, or None where this shape has no graph (run it uncaptured, then :meth:`add`)."""
        key = shape_key(device, host)
        bound = self.runs.get(key)
        if bound is None:
            return None
        try:
            return bound(device)
        except Exception as err:  # noqa: BLE001 - ONNX Runtime reports a failed capture as an untyped Fail
            log.warning("a prompt of shape %s runs without a CUDA graph: %s",
                        {name: value.shape for name, value in device.items()}, str(err).splitlines()[0])
            self.runs[key] = None
            return None

    def add(self, device: dict[str, np.ndarray], host: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
            in_place: dict[str, tuple[str, Any]]) -> None:
        """Bind a graph for this shape (``outputs``: what its uncaptured run returned), where the limit allows."""
        key = shape_key(device, host)
        if key in self.runs or len(self.runs) >= self.limit:
            return
        graph_id = str(len(self.runs) + 1)  # 0 is ONNX Runtime's own default
        self.runs[key] = FixedRun(self.session, self.setup,
                                  {name: (value.shape, value.dtype.type) for name, value in device.items()},
                                  {name: (value.shape, value.dtype.type) for name, value in outputs.items()},
                                  in_place, host, self.setup.run_options(graph_id), self.bound, self.on_device,
                                  skip_unchanged=True)
        log.debug("prompt graph %s bound for %s", graph_id, {name: value.shape for name, value in device.items()})
