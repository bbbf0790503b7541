"""ONNX Runtime backend: CPU or CUDA execution provider, IO binding so the KV cache stays put (the static-KV
form's caches are written in place, its decode replayed as a CUDA graph: :mod:`.ort_static`).

With ``profile_apet`` ApET's time is the sum of the nodes in the ``apet_stage1/`` scope (see :mod:`apet.scopes`)
in a profiled run of the first request's vision inputs, in a session of its own made after that request's first
token, so ``apet-run --stats`` reports it while the request runs the path it runs without ``--stats``.
With ``profile_dir`` both sessions are profiled until :meth:`OnnxRuntimeBackend.end_profiling`
(:mod:`apet.bench.ort_profile` turns the two traces into time per scope).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from apet import scopes
from apet.contracts.io import (
    IMAGE_START,
    INJECTED_EMBEDS,
    INJECTED_ROWS,
    KEEP_INDEX,
    LOGITS,
    STAGE2_INDEX,
    VISUAL_EMBEDS,
    past_names,
    present_names,
)
from apet.errors import BackendError, option
from apet.manifest import Manifest
from apet.models.family import Layout, VisionInputs
from apet.models.registry import family_of
from apet.runtime.backends.base import (
    Backend,
    FirstToken,
    VisionOutput,
    injected_inputs,
    load_embedding_table,
    no_injected,
    splice_numpy,
)
from apet.runtime.backends.ort_first_token import VISION_OUTPUTS, DeviceRows, VisionPart, splice_feeds
from apet.runtime.backends.ort_graphed import (
    GraphedVision,
    VisionSessionForm,
    fixed_shapes,
    graph_types,
    typed_inputs,
)
from apet.runtime.backends.ort_options import (
    CUDA_PROVIDER,
    check_provider,
    cuda_provider,
    graph_rewrites,
    load_cuda_libraries,
    names_itself,
    session_options,
)
from apet.runtime.backends.ort_packages import installed_distributions, no_cuda_provider
from apet.runtime.backends.ort_session import SessionSetup
from apet.runtime.backends.ort_static import StaticKV
from apet.runtime.backends.ort_vision import load_for_graphs

log = logging.getLogger(__name__)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, artifact_dir: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None,
                 profile_apet: bool = False, profile_dir: Path | None = None, cuda_graphs: bool = True,
                 decode_attention: str = "auto", rewrites: str | Iterable[str] | None = None) -> None:
        super().__init__(artifact_dir, manifest)
        import onnxruntime as ort  # a base dependency; imported here so listing backends stays cheap

        self._ort = ort
        wanted = CUDA_PROVIDER if device.startswith("cuda") else "CPUExecutionProvider"
        if wanted == CUDA_PROVIDER:
            load_cuda_libraries(ort)
        available = ort.get_available_providers()
        if wanted == CUDA_PROVIDER and wanted not in available:
            raise BackendError(*no_cuda_provider(available, installed_distributions()))
        if wanted not in available:
            raise BackendError(f"ONNX Runtime has no {wanted} here (available: {available})",
                               "reinstall onnxruntime (pip install --force-reinstall onnxruntime)")
        try:
            self.rewrites = graph_rewrites(rewrites)
        except ValueError as err:
            raise BackendError(str(err), f"pass {option('ort_rewrites', 'default')} or a comma list of the known "
                                         "names") from None
        options = session_options(ort, threads or 0)
        providers = [cuda_provider(self.rewrites, ort.__version__), "CPUExecutionProvider"] \
            if wanted == CUDA_PROVIDER else [wanted]
        self.device_type = "cuda" if wanted == CUDA_PROVIDER else "cpu"
        self._profile_apet = profile_apet  # until the first request's ApET is read (apet_ms)
        self._options, self._providers = options, providers
        vision_options, llm_options = options, options
        if profile_dir is not None:
            Path(profile_dir).mkdir(parents=True, exist_ok=True)
            vision_options = _profiling(ort, options, Path(profile_dir) / "vision")
            llm_options = _profiling(ort, options, Path(profile_dir) / "llm")
        vision_path = self.artifact_dir / manifest.graphs["vision"].file
        # the vision graph as a CUDA graph where its shapes are fixed (not while profiling: that reads node times)
        self.graphed_vision = None if profile_dir is not None else \
            GraphedVision.of(vision_path, manifest.graphs["vision"],
                             SessionSetup(ort, vision_options, providers, self.device_type, cuda_graphs),
                             VisionSessionForm.of(self.rewrites))
        self.vision_path = vision_path
        self._vision_session = lambda: ort.InferenceSession(str(vision_path), vision_options, providers=providers)
        # first-token: vision, splice and prefill as one graph (ort_first_token.py), where it applies
        first_vision = self._first_token_vision(vision_path, profile_dir is not None,
                                                names_itself(rewrites, "first-token")) \
            if "first-token" in self.rewrites else None
        self.vision = None if self.graphed_vision is not None or first_vision is not None else self._vision_session()
        # the static-KV form (--kv-cache static): caches on the device, decode as a CUDA graph (ort_static.py)
        self.static = StaticKV(self.artifact_dir, manifest, SessionSetup(ort, llm_options, providers,
                                                                         self.device_type, cuda_graphs,
                                                                         decode_attention, self.rewrites),
                               np.float16 if manifest.dtype == "fp16" else np.float32, first_vision) \
            if manifest.kv_cache == "static" else None
        # the inputs the first-token graph casts on the device; None where first tokens run apart (the composed
        # graph's vision weights are not kept: its session holds them)
        self.first_cast = first_vision.float32_inputs if self.static is not None and self.static.first is not None \
            else None
        self.vision_types = graph_types(manifest.graphs["vision"].inputs)
        self.llm = self.static.entry_session if self.static is not None else \
            ort.InferenceSession(str(self.artifact_dir / manifest.graphs["llm"].file), llm_options, providers=providers)
        check_provider(self.llm, wanted)
        self.dtype = np.float16 if manifest.dtype == "fp16" else np.float32
        self.table = load_embedding_table(self.artifact_dir, manifest)
        self.outputs = [o.name for o in self.llm.get_outputs()]
        self.has_image_start = IMAGE_START in {i.name for i in self.llm.get_inputs()}
        self.injected_layers = manifest.model.decoder.injected_layers  # the llm graph takes injected inputs
        self.past_names = past_names(manifest.model.decoder.num_layers)
        self.present_names = present_names(manifest.model.decoder.num_layers)
        self.past: list = []
        self.image_start: np.ndarray | None = None
        self.stage2_index: np.ndarray | None = None

    def _first_token_vision(self, vision_path: Path, profiled: bool, named: bool) -> VisionPart | None:
        """The vision graph for the first-token graph (the form the vision session would run), or None where the
        rewrite does not apply (vision and prefill then run apart, as without it; a warning where the rewrite was
        ``named``, else logged at info: it is in the default set, and most artifacts are not the form it takes)."""
        manifest, spec = self.manifest, self.manifest.graphs["vision"]
        why = None
        if manifest.kv_cache != "static":
            why = "it joins the static-KV form's prefill (apet-export --kv-cache static)"
        elif profiled:
            why = "a profiled run times the vision graph in its own session"
        elif manifest.model.decoder.injected_layers:
            why = "the LLM takes per-layer visual inputs"
        elif family_of(manifest).processor(None, manifest).layout_reads_kept_values:  # no tokenizer read
            why = f"the {manifest.model.family} layout reads the kept indices, known only after the vision graph"
        elif fixed_shapes(spec.inputs, 1) is None or fixed_shapes(spec.outputs, 1) is None:
            why = "the vision graph has dims besides the batch"
        if why is not None:
            log.log(logging.WARNING if named else logging.INFO,
                    "the first-token rewrite does not apply: %s; vision and prefill run apart", why)
            return None
        if self.graphed_vision is None:
            return VisionPart(onnx.load(str(vision_path)))
        form = self.graphed_vision.form
        model, cast = load_for_graphs(vision_path, form.token_layout, form.cast_inputs, form.skip_layer_norms,
                                      form.pack_projections)
        model = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
        return VisionPart(model, cast, form.disabled_optimizers)

    def first_token(self, inputs: VisionInputs, layout_for: Callable[[np.ndarray], Layout]) -> FirstToken:
        """With first-token: the prompt laid out first (the family's layout reads only how many rows an image
        keeps: zeros of the vision graph's kept-index shape stand in), then vision, splice and prefill in one run."""
        runs = inputs.all_runs()
        if self.first_cast is None or len(runs) != 1:
            return super().first_token(inputs, layout_for)
        self.check_batch(inputs.items)
        arrays = runs[0]
        spec = self.manifest.graphs["vision"]
        rows = int(next(iter(arrays.values())).shape[0])
        keep_shape = fixed_shapes(spec.outputs, rows)[KEEP_INDEX][0]
        start = time.perf_counter()
        layout = layout_for(np.zeros(keep_shape, dtype=np.int64))
        laid_out = time.perf_counter()
        self.check_prompt(layout)
        if not self.static.takes_first_token(layout.attention_mask):  # left padding: vision, then the exported prompt
            first = super().first_token(inputs, lambda keep_index: layout)  # the layout reads no kept values
            first.layout_ms = (laid_out - start) * 1e3
            return first
        self.image_start = np.ascontiguousarray(layout.image_start, dtype=np.int64)
        feeds = {**typed_inputs(arrays, self.first_cast, self.vision_types),
                 **splice_feeds(self.table, layout.token_ids, layout.visual_rows, int(np.prod(keep_shape))),
                 **self._feeds(None, layout.positions, layout.attention_mask)}
        values = self.static.first_token(feeds, *layout.token_ids.shape)
        self.stage2_index = self.static.stage2_index
        outputs = {name: values[graph_name] for name, graph_name in VISION_OUTPUTS.items()}
        if not isinstance(outputs[VISUAL_EMBEDS], np.ndarray):  # a bound run left them on the device
            outputs[VISUAL_EMBEDS] = DeviceRows(outputs[VISUAL_EMBEDS], self.static.first)
        visual = VisionOutput.of(outputs)
        return FirstToken(visual, layout, values[LOGITS][:, -1].astype(np.float32), 0.0, (laid_out - start) * 1e3,
                          (time.perf_counter() - laid_out) * 1e3)

    def _encode(self, arrays: dict[str, np.ndarray]) -> VisionOutput:
        if self.graphed_vision is not None:  # it types the arrays itself (float inputs may be cast on the device)
            outputs = self.graphed_vision(arrays)
            if outputs is not None:
                return VisionOutput.of(outputs)
        feed = self._exported_feed(arrays)
        if self.vision is None:  # this batch size could not be graphed
            self.vision = self._vision_session()
        names = [o.name for o in self.vision.get_outputs()]
        return VisionOutput.of(dict(zip(names, self.vision.run(None, feed))))

    def apet_ms(self, visual: VisionOutput, inputs: VisionInputs | None = None) -> float | None:
        """With ``profile_apet``, once: ApET's kernel ms in the vision graph on ``inputs`` (:func:`profiled_apet_ms`),
        apart from the request, which ran its usual path (the graphed vision or the first-token graph cannot be
        profiled per node). The profiled session holds a second copy of the vision weights while it runs."""
        if not self._profile_apet or inputs is None:
            return visual.apet_ms
        self._profile_apet = False
        feeds = [self._exported_feed(run) for run in inputs.all_runs()]
        try:
            return profiled_apet_ms(self._ort, self.vision_path, self._options, self._providers, feeds)
        except Exception as err:  # noqa: BLE001 - the answer does not depend on it (ONNX Runtime's errors are
            # untyped: e.g. no device memory for the second copy of the vision weights)
            fix = "set TMPDIR to a writable directory with free space" if isinstance(err, OSError) else \
                "on a device short of memory leave out --stats"
            log.warning("ApET's time could not be profiled (%s: %s); %s", type(err).__name__,
                        (str(err).splitlines() or [""])[0], fix)
            return None

    def _exported_feed(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``arrays`` as the exported vision graph takes them (float inputs in the artifact's dtype)."""
        return {name: value.astype(self.dtype) if value.dtype.kind == "f" else value for name, value in arrays.items()}

    def end_profiling(self) -> dict[str, Path]:
        """Stop profiling (``profile_dir``) and return each session's trace (chrome-trace JSON)."""
        return {"vision": Path(self.vision.end_profiling()), "llm": Path(self.llm.end_profiling())}

    def _empty_past(self, batch: int) -> list:
        spec = self.manifest.model.decoder
        zeros = np.zeros((batch, spec.num_kv_heads, 0, spec.head_dim), dtype=self.dtype)
        return [self._ort.OrtValue.ortvalue_from_numpy(zeros, self.device_type) for _ in self.past_names]

    def _feeds(self, embeds: np.ndarray | None, positions: np.ndarray, mask: np.ndarray,
               injected: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The LLM graph's inputs besides the cache, as host arrays by name (``embeds`` None: the first-token graph
        computes them)."""
        feeds = {"position_ids": np.ascontiguousarray(positions, dtype=np.int64),
                 "attention_mask": np.ascontiguousarray(mask, dtype=np.int64)}
        if embeds is not None:
            feeds["inputs_embeds"] = np.ascontiguousarray(embeds, dtype=self.dtype)
        if self.has_image_start:
            feeds[IMAGE_START] = self.image_start
        if self.injected_layers:
            spec = self.manifest.model.decoder
            injected = injected or no_injected(self.injected_layers, spec.hidden_size, *embeds.shape[:2], self.dtype)
            feeds[INJECTED_EMBEDS] = np.ascontiguousarray(injected[0], dtype=self.dtype)
            feeds[INJECTED_ROWS] = injected[1]
        return feeds

    def _run(self, embeds: np.ndarray, positions: np.ndarray, mask: np.ndarray,
             injected: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        binding = self.llm.io_binding()
        for name, value in self._feeds(embeds, positions, mask, injected).items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self.past_names, self.past):
            binding.bind_ortvalue_input(name, value)
        for name in self.outputs:
            binding.bind_output(name, "cpu" if name in (LOGITS, STAGE2_INDEX) else self.device_type)
        self.llm.run_with_iobinding(binding)
        values = dict(zip(self.outputs, binding.get_outputs()))
        self.past = [values[name] for name in self.present_names]
        self.last_outputs = values
        return values[LOGITS].numpy()[:, -1].astype(np.float32)

    def _prefill(self, layout: Layout, visual: VisionOutput) -> np.ndarray:
        self.image_start = np.ascontiguousarray(layout.image_start, dtype=np.int64)
        self.past = self._empty_past(layout.batch)
        embeds = splice_numpy(self.table, layout.token_ids, np.asarray(visual.embeds), layout.visual_rows)
        injected = injected_inputs(visual.injected, self.injected_layers, layout.visual_rows) \
            if self.injected_layers else None
        if self.static is not None:
            logits = self.static.prefill(self._feeds(embeds, layout.positions, layout.attention_mask, injected),
                                         *layout.token_ids.shape)
            self.stage2_index = self.static.stage2_index
            return logits
        logits = self._run(embeds, layout.positions, layout.attention_mask, injected)
        if STAGE2_INDEX in self.last_outputs:  # meaningful at prefill only (a decode step has no image span)
            self.stage2_index = self.last_outputs[STAGE2_INDEX].numpy()
        return logits

    def _decode(self, token_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if self.static is not None:
            return self.static.decode(self.table[token_ids][:, None], positions, attention_mask)
        return self._run(self.table[token_ids][:, None], positions, attention_mask)

    def decode_attention(self) -> str | None:
        """How the static-KV graphs attend (``gqa`` | ``graph``, :mod:`.ort_static`; a left-padded batch takes the
        exported graphs either way); None for the dynamic form."""
        if self.static is None:
            return None
        return "gqa" if self.static.gqa is not None else "graph"

    def vision_graphed(self) -> bool:
        """Whether the vision graph runs as a CUDA graph (:mod:`.ort_graphed`) for the batch sizes seen so far."""
        runs = self.graphed_vision.runs if self.graphed_vision is not None else {}
        return bool(runs) and all(run is not None for run in runs.values())

    def prompt_graphed(self) -> bool:
        """Whether the prefill holds a CUDA graph for a prompt shape seen so far (:mod:`.ort_prompt_graphs`)."""
        graphs = self.static.prompt_graphs if self.static is not None else None
        return _any_captured(graphs)

    def first_token_graphed(self) -> bool:
        """Whether the first-token graph (vision, splice and prefill in one run) holds a CUDA graph for a prompt shape
        seen so far: with it, the vision and prefill graphs above may never run."""
        first = self.static.first if self.static is not None else None
        return first is not None and _any_captured(first.graphs)

    def cache_lengths(self) -> list[int]:
        if self.static is not None:
            return self.static.cache_lengths()
        return [int(value.shape()[2]) for value in self.past[::2]]


def _any_captured(graphs: Any) -> bool:
    """Whether a :class:`~.ort_prompt_graphs.PromptGraphs` (or None) holds a graph for a shape seen so far."""
    return graphs is not None and any(run is not None for run in graphs.runs.values())


def _profiling(ort, base, prefix: Path):
    """Session options like ``base`` (threads, config entries) with ONNX Runtime's profiler writing to ``prefix``."""
    return session_options(ort, base.intra_op_num_threads, prefix)


def profiled_apet_ms(ort, vision_path: Path, options, providers: list, feeds: list[dict[str, np.ndarray]]) -> float:
    """ApET's stage-1 kernel ms in the vision graph at ``vision_path`` on ``feeds`` (one request's vision runs), read
    from ONNX Runtime's profile of a session of its own: the runs are made twice and only the second, warm pass is
    read (the first includes ONNX Runtime's first-run setup). The session and its trace are gone afterwards."""
    with tempfile.TemporaryDirectory(prefix="apet-ort-profile-") as scratch:
        session = ort.InferenceSession(str(vision_path), _profiling(ort, options, Path(scratch) / "vision"),
                                       providers=providers)
        for _ in range(2):
            for feed in feeds:
                session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    return scope_ms(last_runs(events, len(feeds)), scopes.APET_STAGE1)


def last_runs(events: list, runs: int) -> list:
    """The events of an ONNX Runtime profile from its last ``runs`` session runs on (their ``model_run`` events
    start them)."""
    starts = sorted(float(e["ts"]) for e in events if isinstance(e, dict) and e.get("name") == "model_run")
    if len(starts) < runs:
        return events
    first = starts[-runs]
    return [e for e in events if isinstance(e, dict) and float(e.get("ts", 0)) >= first]


def scope_ms(events: list, scope: str) -> float:
    """Milliseconds of kernel time of the nodes in ``scope`` in an ONNX Runtime profile (chrome trace JSON)."""
    prefix = f"/{scope}/"
    micros = sum(float(e.get("dur", 0)) for e in events if isinstance(e, dict) and e.get("cat") == "Node"
                 and str(e.get("name", "")).endswith("_kernel_time") and prefix in str(e.get("name", "")))
    return micros / 1e3
