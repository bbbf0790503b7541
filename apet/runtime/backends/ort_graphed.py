"""The vision graph as a CUDA graph: per batch size, inputs and outputs bound once to device buffers
(:class:`apet.runtime.backends.ort_session.FixedRun`, as the static decode step), so the CUDA execution provider
replays it (``enable_cuda_graph``: it captures after its warm-up runs and from then on replays the launches at the
same addresses); every batch size's graph lives in one session. It applies where the artifact fixes every dim but
the batch (LLaVA-1.5: one 336² image per row, ApET's budget K): its ~800 launches per image become one, which is most of
the vision run's host time (docs/benchmarks.md, "ONNX Runtime CUDA on the static-KV form").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apet.runtime.backends.ort_session import FixedRun, GraphSessions, SessionSetup
from apet.runtime.backends.ort_vision import load_for_graphs

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


def graph_types(specs: list[dict]) -> dict[str, type]:
    """Manifest IO specs -> {name: numpy dtype}."""
    return {spec["name"]: np.dtype(spec["dtype"]).type for spec in specs}


def typed_inputs(arrays: dict[str, np.ndarray], float32_inputs: frozenset[str],
                 graph_types: dict[str, type]) -> dict[str, np.ndarray]:
    """Each array as the vision graph takes it: its graph type, or float32 for an input the graph casts on the
    device (a float64 array rounded to the graph's type first, so the device's cast leaves it as the host's would)."""
    typed = {}
    for name, array in arrays.items():
        kind = np.float32 if name in float32_inputs else graph_types[name]
        if name in float32_inputs and array.dtype != np.float32:
            array = array.astype(graph_types[name])
        typed[name] = array if array.dtype == kind else array.astype(kind)
    return typed


@dataclass(frozen=True)
class VisionSessionForm:
    """How the graphed vision session is made (:mod:`.ort_vision`): its attention in token layout and its float16
    inputs taken as float32 and cast on the device (both bit-identical), and the ONNX Runtime graph transformers
    left out, by the names ONNX Runtime gives them. ``MatMulAddFusion`` makes each biased projection a ``Gemm`` whose
    CUDA kernel first broadcasts the bias into the output; without it the bias is added after the ``MatMul`` as the
    graph writes it (float16 roundings differ by at most 0.002 in LLaVA-1.5's visual tokens, kept indices equal;
    0.2 ms less GPU time per image on the H200, docs/benchmarks.md)."""

    token_layout: bool = True
    cast_inputs: bool = True
    disabled_optimizers: tuple[str, ...] = ("MatMulAddFusion",)
    skip_layer_norms: bool = False  # residual + bias + LayerNorm as one node (ort_vision.skip_layer_norms)
    pack_projections: bool = False  # q/k/v and their biases as one MatMul, one Add, a Split (ort_pack)

    @classmethod
    def of(cls, rewrites: frozenset[str]) -> "VisionSessionForm":
        """The form with the optional rewrites named in ``rewrites`` (:data:`.ort_options.GRAPH_REWRITES`)."""
        return cls(skip_layer_norms="vision-skip-norms" in rewrites,
                   pack_projections="pack-projections" in rewrites)


class GraphedVision:
    """The vision graph per batch size as a CUDA graph (:class:`FixedRun`), every batch size's graph in one session
    (``gpu_graph_id`` = the batch size, dims left free): a session per batch size would load the vision weights once
    per size. Where ONNX Runtime refuses that session, or a capture in it fails, each batch size gets its own
    fixed-batch session; a batch whose session ONNX Runtime refuses to capture (a node it would place on the CPU) is
    remembered and runs ungraphed."""

    def __init__(self, path: Path, graph_spec: Any, setup: SessionSetup,
                 form: VisionSessionForm = VisionSessionForm()) -> None:
        self.path, self.spec, self.setup, self.form = path, graph_spec, setup, form
        self.graph_types = graph_types(graph_spec.inputs)
        self.runs: dict[int, FixedRun | None] = {}
        self.sessions: GraphSessions | None = None  # made with the rewritten graph, on first use
        self._model: Path | bytes | None = None  # the graph the sessions load, rewritten on first use
        self._float32_inputs: frozenset[str] = frozenset()  # inputs the rewritten graph casts on the device

    @classmethod
    def of(cls, path: Path, graph_spec: Any, setup: SessionSetup,
           form: VisionSessionForm = VisionSessionForm()) -> "GraphedVision | None":
        """Where it applies: CUDA graphs asked for on the CUDA execution provider, every dim fixed but the batch."""
        if not setup.graphs:
            return None
        if fixed_shapes(graph_spec.inputs, 1) is None or fixed_shapes(graph_spec.outputs, 1) is None:
            log.info("vision runs without a CUDA graph: its inputs or outputs have dims besides the batch")
            return None
        return cls(path, graph_spec, setup, form)

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The vision outputs by name for the processor's arrays, or None where this batch size cannot be graphed
        (run it ungraphed)."""
        batch = int(next(iter(arrays.values())).shape[0])
        if batch not in self.runs:
            self.runs[batch] = self._run(batch)
        run = self.runs[batch]
        if run is None:
            return None
        try:
            return run(typed_inputs(arrays, self._float32_inputs, self.graph_types))
        except Exception as err:  # noqa: BLE001 - ONNX Runtime reports a failed capture as an untyped Fail
            if not self.sessions.refused(run.session, err):
                raise
            self.runs = {}
            return self(arrays)

    def _run(self, batch: int) -> FixedRun | None:
        if self._model is None:
            self._model, self._float32_inputs = load_for_graphs(
                self.path, self.form.token_layout, self.form.cast_inputs, self.form.skip_layer_norms,
                self.form.pack_projections)
        if self.sessions is None:
            self.sessions = GraphSessions(self.setup, self._model, lambda: self._model,
                                          disabled_optimizers=self.form.disabled_optimizers, what="vision")
        try:
            session, run_options = self.sessions.session(batch)
        except Exception as err:  # noqa: BLE001 - ONNX Runtime refuses capture with an untyped Fail
            log.warning("vision at batch %d runs without a CUDA graph: %s", batch, str(err).splitlines()[0])
            return None
        inputs = {name: (shape, np.float32 if name in self._float32_inputs else kind)
                  for name, (shape, kind) in fixed_shapes(self.spec.inputs, batch).items()}
        return FixedRun(session, self.setup, inputs, fixed_shapes(self.spec.outputs, batch),
                        run_options=run_options)
