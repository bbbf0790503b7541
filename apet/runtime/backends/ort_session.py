"""ONNX Runtime sessions of one backend and runs bound once (the pieces every CUDA-graph path shares: the static
decode step, the graphed vision, the prompt graphs).

CUDA graphs (ONNX Runtime's ``enable_cuda_graph``) need every bound address and every shape fixed from the capturing
run on. A session whose shapes are fixed by a free-dimension override (``batch``) holds one graph; a session whose
shapes stay free holds one graph per ``gpu_graph_id`` (a run option), each captured at the shapes of its first runs,
and ONNX Runtime accepts it only where its shape computations need no copies between host and device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apet.runtime.backends.ort_options import scoped_environment, session_options

log = logging.getLogger(__name__)
GRAPH_ID = "gpu_graph_id"  # ONNX Runtime's run option: which of a session's CUDA graphs a run captures or replays
UNCAPTURED = "-1"  # its value for a run that neither captures nor replays
SKIP_UNCHANGED_BYTES = 64 * 1024  # a prompt graph's bound input this small is uploaded only when its values change
# (FixedRun's skip_unchanged): each upload is a synchronous copy, and a repeated question's positions, mask and
# splice index repeat (comparing costs far less); larger inputs (pixels) are uploaded every call


@dataclass(frozen=True)
class SessionSetup:
    """What every session of one backend shares: the onnxruntime module, options, providers, device."""

    ort: Any
    options: Any
    providers: list
    device_type: str  # "cuda" | "cpu": where caches and bound inputs live
    cuda_graphs: bool
    decode_attention: str = "auto"  # auto | gqa | graph (apet.runtime.backends.ort_static)
    rewrites: frozenset[str] = frozenset()  # the optional graph rewrites (ort_options.GRAPH_REWRITES)
    environment: Mapping[str, str] = field(default_factory=dict)  # ONNX Runtime's kernel switches its sessions
    # are made under (ort_options.scoped_environment; the decode sessions' with flash-decode)

    @property
    def graphs(self) -> bool:
        """Fixed-shape sessions are replayed as CUDA graphs (asked for, on the CUDA execution provider)."""
        return self.cuda_graphs and self.device_type == "cuda"

    def session(self, model: Path | bytes, batch: int | None = None, weights_dir: Path | None = None,
                shape_graphs: bool = False, disabled_optimizers: tuple[str, ...] = ()) -> Any:
        """A session of ``model`` (a file, or a serialized graph whose external weights lie in ``weights_dir``);
        with ``batch`` its batch dim is fixed (and CUDA graphs on, where requested); with ``shape_graphs`` CUDA
        graphs are on while every dim stays free (one graph per ``gpu_graph_id``: :func:`run_options`);
        ``disabled_optimizers`` names ONNX Runtime graph transformers to leave out."""
        with scoped_environment(self.environment):
            return self._session(model, batch, weights_dir, shape_graphs, disabled_optimizers)

    def _session(self, model: Path | bytes, batch: int | None, weights_dir: Path | None, shape_graphs: bool,
                 disabled_optimizers: tuple[str, ...]) -> Any:
        source = model if isinstance(model, bytes) else str(model)
        capture = self.graphs and (batch is not None or shape_graphs)
        extra = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
        if batch is None and weights_dir is None and not capture:
            return self.ort.InferenceSession(source, self.options, providers=self.providers, **extra)
        options = session_options(self.ort, self.options.intra_op_num_threads)
        if weights_dir is not None:  # a graph rewritten in memory reads the artifact's weight files where they are
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
        if batch is not None:
            options.add_free_dimension_override_by_name("batch", batch)
        providers = self.providers
        if capture:
            providers = [(name, {**opts, "enable_cuda_graph": "1"}) if isinstance(name, str) else (name, opts)
                         for name, opts in _with_options(self.providers)]
        return self.ort.InferenceSession(source, options, providers=providers, **extra)

    def run_options(self, graph_id: str) -> Any:
        """Run options that pick the session's CUDA graph ``graph_id`` (:data:`UNCAPTURED`: none)."""
        options = self.ort.RunOptions()
        options.add_run_config_entry(GRAPH_ID, graph_id)
        return options


class GraphSessions:
    """The sessions a graph runs in at each batch size with CUDA graphs: one session holding a graph per batch size
    (``gpu_graph_id`` = the batch size, every dim free) where ONNX Runtime accepts it, so the weights are loaded
    once; else, or once a capture in it failed (:meth:`refuse`), a session per batch size with that dim fixed.
    ``shared_model`` gives the graph for the one session (called once, when first needed); ``model`` is the one the
    fixed-batch sessions load."""

    def __init__(self, setup: SessionSetup, model: Path | bytes, shared_model: Callable[[], Path | bytes],
                 weights_dir: Path | None = None, disabled_optimizers: tuple[str, ...] = (), what: str = "") -> None:
        self.setup, self.model, self.shared_model, self.weights_dir = setup, model, shared_model, weights_dir
        self.disabled_optimizers, self.what = disabled_optimizers, what
        self.shared: Any = None  # the one session; None: not made yet, False: refused

    def session(self, batch: int) -> tuple[Any, Any]:
        """(session, run options picking its graph) for ``batch`` rows; raises where ONNX Runtime refuses even
        the fixed-batch session. Without CUDA graphs (``setup.graphs`` off) always a fixed-batch session."""
        if self.shared is None and self.setup.graphs:
            try:
                self.shared = self.setup.session(self.shared_model(), None, self.weights_dir, shape_graphs=True,
                                                 disabled_optimizers=self.disabled_optimizers)
            except Exception as err:  # noqa: BLE001 - ONNX Runtime refuses CUDA graphs with an untyped Fail
                self._fallback(str(err))
        if self.shared is not None and self.shared is not False:
            return self.shared, self.setup.run_options(str(batch))  # graph id = batch size (0: ONNX Runtime's own)
        return self.setup.session(self.model, batch, self.weights_dir,
                                  disabled_optimizers=self.disabled_optimizers), None

    def refused(self, session: Any, err: Exception) -> bool:
        """Whether ``err``, raised by a run in ``session``, is a failed capture in the one shared session; then every
        batch size gets its own session from now on (the caller makes its runs again). Else the caller re-raises."""
        if session is not self.shared:
            return False
        self._fallback(f"a CUDA graph in the shared session failed: {err}")
        return True

    def _fallback(self, why: str) -> None:
        log.warning("%s runs in a session per batch size (each its own copy of the weights): %s", self.what,
                    why.splitlines()[0])
        self.shared = False


def _with_options(providers: list) -> list[tuple[str, dict]]:
    return [(p, {}) if isinstance(p, str) else (p[0], dict(p[1])) for p in providers]


class FixedRun:
    """One session at fixed shapes with its bindings made once (CUDA graph replays need every address unchanged):
    device inputs refilled in place (with ``skip_unchanged``, small ones only where their values changed:
    :data:`SKIP_UNCHANGED_BYTES`; a prompt's, whose values repeat with the question, not a decode step's, whose
    position and mask change every step),
    buffers bound as both input and output (the caches, written in place), inputs the kernels read on the host
    (GroupQueryAttention's total length), outputs on the device and read back (those in ``on_device`` returned as
    their OrtValues, for the caller to read if it needs them).
    ``run_options`` picks the graph where the session holds several (:meth:`SessionSetup.run_options`); ``bound``:
    OrtValues bound as they are (weights held for several sessions, :mod:`.ort_bound_weights`)."""

    def __init__(self, session: Any, setup: SessionSetup, inputs: dict[str, tuple[tuple, Any]],
                 outputs: dict[str, tuple[tuple, Any]], in_place: dict[str, tuple[str, Any]] | None = None,
                 host_constants: dict[str, np.ndarray] | None = None, run_options: Any = None,
                 bound: dict[str, Any] | None = None, on_device: frozenset[str] = frozenset(),
                 skip_unchanged: bool = False) -> None:
        new = setup.ort.OrtValue.ortvalue_from_shape_and_type
        self.session, self.run_options = session, run_options
        self.inputs = {name: new(list(shape), kind, setup.device_type, 0) for name, (shape, kind) in inputs.items()}
        self.input_types = {name: np.dtype(kind) for name, (_, kind) in inputs.items()}
        self.outputs = {name: new(list(shape), kind, setup.device_type, 0) for name, (shape, kind) in outputs.items()}
        host = {name: setup.ort.OrtValue.ortvalue_from_numpy(value) for name, value in (host_constants or {}).items()}
        self.binding = session.io_binding()
        for name, value in {**self.inputs, **host, **(bound or {})}.items():
            self.binding.bind_ortvalue_input(name, value)
        for input_name, (output_name, buffer) in (in_place or {}).items():
            self.binding.bind_ortvalue_input(input_name, buffer)
            self.binding.bind_ortvalue_output(output_name, buffer)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)
        self._host = host  # kept alive: bound by address
        self.on_device = on_device
        self.skip_unchanged = skip_unchanged
        self.uploaded: dict[str, np.ndarray] = {}  # the small inputs' values in their bound buffers

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            if self.skip_unchanged and self._holds(name, array):
                continue
            self.inputs[name].update_inplace(array)
            if self.skip_unchanged and array.nbytes <= SKIP_UNCHANGED_BYTES:  # kept once it is in the buffer
                self.uploaded[name] = array.copy()
        self.session.run_with_iobinding(self.binding, self.run_options)
        return {name: value if name in self.on_device else value.numpy() for name, value in self.outputs.items()}

    def _holds(self, name: str, array: np.ndarray) -> bool:
        """Whether ``name``'s bound buffer holds ``array``'s values already (the small inputs' last uploads are kept
        on the host to compare)."""
        last = self.uploaded.get(name)
        return last is not None and last.dtype == array.dtype and np.array_equal(last, array)
